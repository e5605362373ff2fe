"""Split-KV sparse decode kernel (Triton): attention of one new token over the selected key blocks.

torch's flex decode kernel splits the *whole* key range across programs and walks the block
list inside each split, so at batch 1 it costs about 0.15 ms at 128K whatever the density
(docs/benchmarks.md).  Here the selected block list itself is split: program (b, kv head,
split) takes an equal share of the row's `kv_num[b]` selected blocks, runs an online softmax
of the G query heads of that KV head over them (tl.dot on a [G, block] tile, G padded to 16),
and writes a partial (max, sum, output).  A second small kernel merges the splits.  Work and
memory traffic scale with the selection, not the cache.

The block list is the decode selection's (`decode.step.decode_select`): kv_idx [B, C] int32 with
the first kv_num[b] entries valid; keys outside [start[b], end) are masked (left padding,
unwritten cache slots).  Shapes are static per cache capacity and nothing syncs with the host.

`sparse_decode_attention` runs the compiled kernels on CUDA and the same kernels through
Triton's interpreter on CPU tensors (used by the tests; slow, for small shapes only).
"""

from __future__ import annotations

import math

import torch

from .triton_runtime import HAS_TRITON, LOG2E, device_smem, interpreted, sm_count

if HAS_TRITON:
    import triton
    import triton.language as tl

    def _split_kernel(
        Q, K, V, KV_NUM, KV_IDX, START, END, O_PART, M_PART, L_PART,
        sqb, sqh, sqg, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        sib, sic, s_end,
        HKV, G, S, NUM_SPLITS, qk_scale, softcap,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, D: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        n = tl.load(KV_NUM + b)
        per = (n + NUM_SPLITS - 1) // NUM_SPLITS
        lo = split * per
        hi = tl.minimum(lo + per, n)
        start = tl.load(START + b)
        end = tl.load(END + b * s_end)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, SUB_N)
        q = tl.load(Q + b * sqb + h * sqh + offs_g[:, None] * sqg + offs_d[None, :] * sqd,
                    mask=offs_g[:, None] < G, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        # a selected block is BLOCK_N keys, read as BLOCK_N // SUB_N tiles of SUB_N (large head dims)
        for j in range(lo * (BLOCK_N // SUB_N), hi * (BLOCK_N // SUB_N)):
            blk = tl.load(KV_IDX + b * sib + (j // (BLOCK_N // SUB_N)) * sic)
            tok = blk * BLOCK_N + (j % (BLOCK_N // SUB_N)) * SUB_N + offs_n
            inside = tok < S
            k = tl.load(k_base + tok[:, None] * sks + offs_d[None, :] * skd, mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_G, BLOCK_N], fp32
            if HAS_SOFTCAP:
                # softcap * tanh(s * scale / softcap); tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|) <= 1
                x = s * (qk_scale / (softcap * 1.4426950408889634))
                e = tl.exp(-2.0 * tl.abs(x))
                t = (1.0 - e) / (1.0 + e)
                s = softcap * tl.where(x < 0, -t, t) * 1.4426950408889634
            else:
                s = s * qk_scale  # in log2 units
            ok = (tok >= start) & (tok < end)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + tok[:, None] * svs + offs_d[None, :] * svd, mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        part = (pid * NUM_SPLITS + split) * BLOCK_G
        tl.store(O_PART + (part + offs_g)[:, None] * D + offs_d[None, :], acc)
        tl.store(M_PART + part + offs_g, m_i)
        tl.store(L_PART + part + offs_g, l_i)

    def _merge_kernel(
        O_PART, M_PART, L_PART, OUT, sob, soh, sog, sod, HKV, G, NUM_SPLITS,
        BLOCK_G: tl.constexpr, D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // HKV
        h = pid % HKV
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for s in range(0, NUM_SPLITS):
            m = tl.maximum(m, tl.load(M_PART + (pid * NUM_SPLITS + s) * BLOCK_G + offs_g))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l_tot = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for s in range(0, NUM_SPLITS):
            part = (pid * NUM_SPLITS + s) * BLOCK_G
            w = tl.exp2(tl.load(M_PART + part + offs_g) - m_safe)
            l_tot += w * tl.load(L_PART + part + offs_g)
            acc += w[:, None] * tl.load(O_PART + (part + offs_g)[:, None] * D + offs_d[None, :])
        out = acc / tl.where(l_tot == 0.0, 1.0, l_tot)[:, None]  # a row with no key reads 0, as flex does
        tl.store(OUT + b * sob + h * soh + offs_g[:, None] * sog + offs_d[None, :] * sod,
                 out.to(OUT.dtype.element_ty), mask=offs_g[:, None] < G)

    _jit = {
        # S (the cache length) changes every step of a growing cache: no specialisation on it
        "split": triton.jit(_split_kernel, do_not_specialize=["S"]),
        "merge": triton.jit(_merge_kernel),
    }


def _kernel(name: str, device: torch.device):
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"sparse_decode_attention runs on CUDA; got a {device.type} tensor (CPU runs only under triton's "
            "interpreter: set TRITON_INTERPRET=1 before importing triton, as the tests do)"
        )
    return _jit[name]


def num_splits(batch: int, kv_heads: int, capacity_blocks: int, device: torch.device) -> int:
    """Splits of the selected block list per (row, KV head): about one program per SM.

    Measured on the H100 at 128K, 20% of blocks (docs/design-notes.md, "The decode kernel"):
    one program per SM beat two (0.054 vs 0.071 ms at batch 1) and four (0.097 ms).  A function
    of static shapes only, so a step never recompiles or syncs.
    """
    sms = sm_count(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(capacity_blocks, 64, math.ceil(sms / max(1, batch * kv_heads))))


def shared_memory(elem: int, head_dim: int, block_g: int, sub_n: int, num_stages: int) -> int:
    """Bytes of shared memory a launch of the split kernel needs, modelled as
    triton_prefill.shared_memory: the query tile (BLOCK_G x D), the K and V tiles (SUB_N x D
    each; num_stages of each in flight in 16-bit, num_stages - 1 in float32, one buffer shared by
    both without pipelining) and, in float32 (elem 4: products on the FMA units), P (BLOCK_G x
    SUB_N float32) on its way to the product's operand layout.  Triton 3.6 compiling for sm_90
    matched it to within BLOCK_G x 4 bytes in float32."""
    kv_tile = sub_n * head_dim * elem
    if num_stages <= 1:
        kv = kv_tile
    else:
        kv = 2 * (num_stages - 1 if elem == 4 else num_stages) * kv_tile
    return block_g * head_dim * elem + kv + (block_g * sub_n * 4 if elem == 4 else 0)


def tiling(block_size: int, head_dim: int, elem: int, device: torch.device,
           num_stages: int | None = None, block_g: int = 16) -> tuple[int, int]:
    """(keys per tile, pipeline stages) that fit shared memory: K and V tiles of SUB_N x D per
    stage.  3 stages measured best at head dim 128, block 128 (H100, section triton_tune);
    larger tiles are split (SUB_N < block) or run fewer stages.  Then, where the query rows
    (block_g) make `shared_memory` exceed the device's limit less 8 KiB, fewer stages, then
    smaller tiles.
    """
    smem = device_smem(device)
    budget = smem - 16 * 1024
    want = 3 if num_stages is None else num_stages
    sub = block_size
    while sub > 16 and 2 * sub * head_dim * elem * min(want, 2) > budget:
        sub //= 2
    per_stage = 2 * sub * head_dim * elem
    stages = max(1, min(want, budget // per_stage))
    while shared_memory(elem, head_dim, block_g, sub, stages) > smem - 8 * 1024 and (stages > 1 or sub > 16):
        if stages > 1:
            stages -= 1
        else:
            sub //= 2
    return sub, stages


def supported(q: torch.Tensor, block_size: int) -> bool:
    """Shapes this kernel handles: a power-of-two head dim and block size >= 16."""
    d = q.shape[-1]
    return HAS_TRITON and d >= 16 and d & (d - 1) == 0 and block_size >= 16 and block_size & (block_size - 1) == 0


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    softcap: float | None = None,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    sub_tile: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over the selected key blocks.

    q: [B, Hq, 1, D]; k, v: [B, Hkv, S, D] (any strides, last dim contiguous preferred);
    kv_num: [B] int32 selected blocks per row; kv_idx: [B, C] int32 block indices (first
    kv_num[b] valid); start: [B] int32 first real key; end: 0-dim or [B] int32, one past the
    last key.  All query heads of a row share its selection.  Returns [B, Hq, 1, D] in q's dtype.
    splits / num_warps / num_stages / sub_tile override the launch parameters (tuning, tests).
    """
    if not HAS_TRITON:
        raise RuntimeError("sparse_decode_attention needs triton (pip install triton)")
    bsz, hq, L, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if L != 1:
        raise ValueError(f"q has {L} query positions per row; sparse_decode_attention takes 1")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not supported(q, block_size):
        raise ValueError(f"head_dim={d}, block_size={block_size}: both must be powers of two >= 16")
    g = hq // hkv
    block_g = max(16, triton.next_power_of_2(g))
    n_split = splits or num_splits(bsz, hkv, kv_idx.shape[1], q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qv = q.view(bsz, hkv, g, d) if q.is_contiguous() else q.reshape(bsz, hkv, g, d)
    o_part = torch.empty(bsz * hkv * n_split * block_g, d, device=q.device, dtype=torch.float32)
    m_part = torch.empty(bsz * hkv * n_split * block_g, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    out = torch.empty(bsz, hkv, g, d, device=q.device, dtype=q.dtype)
    end = end.to(torch.int32)
    s_end = 1 if end.dim() and end.numel() == bsz else 0
    kv_num = kv_num.reshape(bsz).to(torch.int32)
    start = start.reshape(bsz).to(torch.int32)
    # log2-domain softmax: the kernel uses exp2 (softcap is applied before the log2 scaling)
    qk_scale = scale * LOG2E
    sub_n, stages = tiling(block_size, d, k.element_size(), q.device, num_stages, block_g)
    if sub_tile is not None:
        if sub_tile < 16 or block_size % sub_tile or sub_tile & (sub_tile - 1):
            raise ValueError(f"sub_tile={sub_tile}: must be a power of two >= 16 dividing block_size={block_size}")
        sub_n = sub_tile
    _kernel("split", q.device)[(bsz * hkv, n_split)](
        qv, k, v, kv_num, kv_idx, start, end, o_part, m_part, l_part,
        *qv.stride(), *k.stride(), *v.stride(), *kv_idx.stride(), s_end,
        hkv, g, s, n_split, qk_scale, float(softcap or 1.0),
        BLOCK_G=block_g, BLOCK_N=block_size, SUB_N=sub_n, D=d, HAS_SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
        num_warps=num_warps, num_stages=stages,
    )
    _kernel("merge", q.device)[(bsz * hkv,)](
        o_part, m_part, l_part, out, *out.stride(), hkv, g, n_split, BLOCK_G=block_g, D=d,
    )
    return out.view(bsz, hq, 1, d)
