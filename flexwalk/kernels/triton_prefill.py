"""Block-sparse prefill kernel (Triton): exact attention of each query block over its selected key blocks.

The same computation as the compiled flex call of `kernels.flex.flex` on a selection's BlockMask,
in a kernel of our own, for three things flex's template does not do:

- **Longest rows first.**  Row I of a causal selection keeps about density * I key blocks and
  the dense tail keeps all of them; flex launches a head's query blocks in ascending order, so
  the longest programs start last and the GPU idles while they finish (docs/benchmarks.md 4e).
  Here program (head, m) computes query block NQ - 1 - m: the tail starts first, and the
  short rows fill the end.  No side stream, no split of the tail.
- **Heads fastest.**  The launch grid is (batch * heads, query blocks), so the programs that run
  together are every head of a few query blocks.  SketchWalk shares one selection across the
  heads of a layer, and GQA shares each key/value head among G query heads, so these programs
  read the same key/value blocks at the same time, where L2 can serve them.
- **The output in transformers' layout.**  It is written as [B, n, Hq, D] (returned as a
  [B, Hq, n, D] view), which is what the attention interface returns, so no transposing copy
  follows.

The block lists are a BlockMask's: full blocks (every element allowed: no mask is evaluated)
and partial blocks (the blocks a query block overlaps, and edges touched by padding), where
the mask of `kernels.flex.make_mask_mod` is applied: causal, keys inside [start[b], end[b]), and
a query always sees its own key (padding rows stay finite).  The selection table term of that
mask_mod is implied by the lists themselves.  Query blocks of q_block rows (the mask's query
block, BLOCK_M rows per program), key blocks of kv_block keys read in tiles of BLOCK_N.

Soft-capping, sliding windows and score_mods are not handled here: `supported` says where this
kernel applies, and the caller (prefill.sparse_prefill) uses flex elsewhere.  On CPU tensors
the kernel runs through Triton's interpreter (tests; slow, small shapes only).
"""

from __future__ import annotations

import functools

import torch

from .. import stats
from .triton_runtime import HAS_TRITON, HOPPER_SMEM, LOG2E, device_smem, interpreted

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _online_softmax(acc, l_i, m_i, s, v, scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """One key tile of the online softmax: s [BLOCK_M, BLOCK_N] scores (masked entries -inf when
        MASKED), times `scale` in the exp2 domain; v the tile's values.  Returns (acc, l_i, m_i)."""
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        if MASKED:  # a row with no key in this tile yet keeps exp2(-inf) = 0 and a finite shift
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s * scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        return acc, l_i, m_new

    def _prefill_kernel(
        Q, K, V, O, F_NUM, F_IDX, P_NUM, P_IDX, START, END, KM, VM, LC, TBL, SHIFT, SEQ_END,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, som, soh,
        sfnb, sfnm, sfib, sfim, spnb, spnm, spib, spim,
        skmb, skmh, skmn, svmb, svmh, svmn, slcb, stb, stm,
        H, G, N, NQ, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
        M_SPLIT: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr, RESIDUAL: tl.constexpr,
        PACKED: tl.constexpr,
    ):
        pid_h = tl.program_id(0)
        pid_m = tl.program_id(1)
        m_blk = (NQ - 1 - pid_m) if REVERSE else pid_m  # tile of BLOCK_M query rows
        row = m_blk // M_SPLIT  # the mask's query block (q_block = M_SPLIT * BLOCK_M rows)
        b = pid_h // H
        h = pid_h % H
        hk = h // G
        SUB: tl.constexpr = KV_BLOCK // BLOCK_N

        if PACKED:  # block-aligned positions; the rows sit `shift` earlier in the packed tensors
            shift = tl.load(SHIFT + row).to(tl.int64)
            n_end = tl.load(SEQ_END + row)  # the end of this query block's sequence
        else:
            shift = 0
            n_end = N
        offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q_ok = offs_m < n_end
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + (offs_m[:, None].to(tl.int64) - shift) * sqm
                    + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh - shift * skn
        v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh - shift * svn

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)

        # loop-invariant tile offsets: each block then costs one scalar base address
        k_off = offs_n[None, :] * skn + offs_d[:, None]  # K tile read as [D, BLOCK_N]
        v_off = offs_n[:, None] * svn + offs_d[None, :]

        # full blocks: every (query, key) pair allowed, no mask, no bounds
        n_full = tl.load(F_NUM + b * sfnb + row * sfnm)
        f_row = F_IDX + b.to(tl.int64) * sfib + row.to(tl.int64) * sfim
        for j in range(0, n_full * SUB):
            blk = tl.load(f_row + j // SUB)
            start_n = (blk * KV_BLOCK + (j % SUB) * BLOCK_N).to(tl.int64)
            k = tl.load(k_base + start_n * skn + k_off)
            s = tl.dot(q, k, input_precision=PRECISION)
            v = tl.load(v_base + start_n * svn + v_off)
            acc, l_i, m_i = _online_softmax(acc, l_i, m_i, s, v, qk_scale, False, PRECISION)

        # partial blocks: causal, keys inside [start, end), a query always sees itself
        start = tl.load(START + b)
        end = tl.load(END + b)
        n_part = tl.load(P_NUM + b * spnb + row * spnm)
        p_row = P_IDX + b.to(tl.int64) * spib + row.to(tl.int64) * spim
        for j in range(0, n_part * SUB):
            blk = tl.load(p_row + j // SUB)
            start_n = blk * KV_BLOCK + (j % SUB) * BLOCK_N
            tok = start_n + offs_n
            inside = tok < n_end
            k = tl.load(k_base + start_n.to(tl.int64) * skn + k_off, mask=inside[None, :], other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION)
            ok = (tok[None, :] <= offs_m[:, None]) & (tok[None, :] >= start) & (tok[None, :] < end)
            ok = (ok | (tok[None, :] == offs_m[:, None])) & inside[None, :]
            s = tl.where(ok, s, float("-inf"))
            v = tl.load(v_base + start_n.to(tl.int64) * svn + v_off, mask=inside[:, None], other=0.0)
            acc, l_i, m_i = _online_softmax(acc, l_i, m_i, s, v, qk_scale, True, PRECISION)

        if RESIDUAL:  # one summary per dropped key block before this query block (flexwalk.kernels.residual)
            first = (row * (M_SPLIT * BLOCK_M)) // KV_BLOCK
            km_base = KM + b.to(tl.int64) * skmb + hk.to(tl.int64) * skmh
            vm_base = VM + b.to(tl.int64) * svmb + hk.to(tl.int64) * svmh
            t_row = TBL + b.to(tl.int64) * stb + row.to(tl.int64) * stm
            for r0 in range(0, first, BLOCK_N):
                jb = r0 + offs_n
                in_row = jb < first
                lc = tl.load(LC + b.to(tl.int64) * slcb + jb, mask=in_row, other=float("-inf"))
                lc = lc * 1.4426950408889634  # ln(count) -> log2(count), the kernel's exp2 domain
                kept = tl.load(t_row + jb, mask=in_row, other=1)
                use = in_row & (kept == 0) & (lc > float("-inf"))
                km = tl.load(km_base + jb[None, :].to(tl.int64) * skmn + offs_d[:, None], mask=in_row[None, :],
                             other=0.0)
                s = tl.dot(q, km, input_precision=PRECISION) * qk_scale + lc[None, :]
                s = tl.where(use[None, :], s, float("-inf"))
                vm = tl.load(vm_base + jb[:, None].to(tl.int64) * svmn + offs_d[None, :], mask=in_row[:, None],
                             other=0.0)
                acc, l_i, m_i = _online_softmax(acc, l_i, m_i, s, vm, 1.0, True, PRECISION)

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b.to(tl.int64) * sob + (offs_m[:, None].to(tl.int64) - shift) * som + h.to(tl.int64) * soh
                 + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_ok[:, None])

    # N (the prompt length) varies by prompt: no specialisation on it, so one compile serves
    # every length of a configuration
    _jit = triton.jit(_prefill_kernel, do_not_specialize=["N", "NQ"])


# Launch parameters of CUDA runs: (BLOCK_N, num_warps, num_stages) by head dim, from the H100
# sweep in bf16 (docs/design-notes.md, "The Triton prefill kernel": 128 x 128 tiles, 8
# warps and 3 stages at head dim 128).  They are where `launch_config` starts: a BLOCK_N above
# the key block is cut to it, and tiles whose shared memory would not fit are made smaller.
TILES = {64: (128, 4, 3), 128: (128, 8, 3), 256: (32, 8, 2)}

# Shared memory is checked against the device's per-block limit: HOPPER_SMEM (H100, H200: 227
# KiB with the opt-in) in the interpreter (CPU tests), what a CUDA device reports on it.
# SMEM_MARGIN of it is left unplanned: `shared_memory` leaves out a few small buffers (BLOCK_M x
# 4 byte conversions of the row statistics, more with the residual: at most 1536 bytes in every
# launch measured).  It must stay under 3 KiB: the bf16 launch measured fastest at head dim 128
# needs 229376 of 232448.
SMEM_MARGIN = 2 * 1024


def shared_memory(dtype: torch.dtype, head_dim: int, block_m: int, block_n: int, num_stages: int) -> int:
    """Bytes of shared memory a launch of the prefill kernel needs, as Triton allocates it.

    - the Q tile, BLOCK_M x D: loaded once, kept in shared memory for both loops (an operand of
      every q @ k product);
    - the K and V tiles, BLOCK_N x D each, pipelined: float16 / bfloat16 keep num_stages of each
      (on Hopper the products are asynchronous wgmma, which still reads one buffer while the
      next loads), float32 num_stages - 1; with one stage K and V take turns in one buffer;
    - float32 only: P, BLOCK_M x BLOCK_N float32.  float32 runs its products on the FMA units
      (input_precision "ieee"), whose operand layout P reaches through shared memory;
      16-bit products take P from registers.

    Calibrated on Triton 3.6 for sm_90: float32, head dim 128, 128 x 128 tiles, 3 stages is
    64 (Q) + 2 x (64 + 64) (K, V) + 64 (P) KiB = 393216 bytes, the need the H200 reported;
    bfloat16 at the same tiles 32 + 3 x (32 + 32) KiB = 229376, what the H100 compiled.  Every
    launch measured (H100, and compiles for sm_90 without a GPU) came to it or up to 1536 bytes
    above it (tests/test_kernel_resources.py)."""
    elem = dtype.itemsize
    q_tile = block_m * head_dim * elem
    kv_tile = block_n * head_dim * elem
    if dtype == torch.float32:
        kv = kv_tile if num_stages <= 1 else 2 * (num_stages - 1) * kv_tile
        return q_tile + kv + block_m * block_n * 4
    return q_tile + (kv_tile if num_stages <= 1 else 2 * num_stages * kv_tile)


def _halvings(x: int, lo: int = 16):
    while x >= lo:
        yield x
        x //= 2


@functools.cache
def launch_config(dtype: torch.dtype, head_dim: int, q_block: int, kv_block: int,
                  smem: int = HOPPER_SMEM) -> tuple[int, int, int, int] | None:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a launch whose `shared_memory` fits `smem`
    bytes less SMEM_MARGIN, or None if no tile does (then `supported` is False).

    From TILES (BLOCK_M = the query block, at most 128 rows, 64 above head dim 128): fewer
    stages first (down to 2), then a smaller BLOCK_N, then a smaller BLOCK_M (a power of two, so
    it still divides the query block: a query block is then M_SPLIT programs), tiles of at least
    16; a single stage only where no pipelined tile fits.  bfloat16 / float16 keep TILES at
    every head dim; float32 (4-byte tiles plus P) takes smaller ones."""
    bn0, warps, st0 = TILES.get(head_dim, (64, 4, 2))
    bm0 = min(q_block, 128 if head_dim <= 128 else 64)
    bn0 = min(bn0, kv_block)
    budget = smem - SMEM_MARGIN
    for lowest in (min(2, st0), 1):
        for bm in _halvings(bm0):
            for bn in _halvings(bn0):
                for stages in range(st0, lowest - 1, -1):
                    if shared_memory(dtype, head_dim, bm, bn, stages) <= budget:
                        return bm, bn, warps, stages
    return None


def supported(q: torch.Tensor, *, q_block: int, kv_block: int, softcap=None, window=None,
              smem: int | None = None) -> bool:
    """Whether `sparse_prefill_attention` handles this call: triton present, a CUDA tensor (or
    the interpreter), a power-of-two head dim 16..256, blocks of 16..256 tokens, a
    float16/bfloat16/float32 dtype, no soft-capping, no sliding window, and a launch
    configuration whose shared memory fits the device (`launch_config`; smem: the bytes to plan
    for instead of the device's, Options.triton_smem_limit)."""
    d = q.shape[-1]
    on = q.device.type == "cuda" or interpreted()
    pow2 = all(x & (x - 1) == 0 for x in (d, q_block, kv_block))
    return (HAS_TRITON and on and softcap is None and window is None and pow2 and 16 <= d <= 256
            and 16 <= kv_block <= q_block <= 256 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and launch_config(q.dtype, d, q_block, kv_block, smem or device_smem(q.device)) is not None)


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    full_num: torch.Tensor,
    full_idx: torch.Tensor,
    part_num: torch.Tensor,
    part_idx: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    q_block: int,
    kv_block: int,
    scale: float | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    reverse: bool = True,
    residual: tuple | None = None,
    smem: int | None = None,
) -> torch.Tensor:
    """Causal attention of q over the listed key blocks.

    q: [B, Hq, n, D]; k, v: [B, Hkv, n, D] (Hq a multiple of Hkv; any strides with the head dim
    contiguous).  full_num / part_num: [B, nq'] or [B, 1, nq'] (a BlockMask's) int32 block
    counts per query block of q_block rows (nq' >= ceil(n / q_block): bucket rows past n are
    ignored); full_idx / part_idx: [B, nq', W] or [B, 1, nq', W] int32 key block indices
    (kv_block keys each), the first count entries valid and unique.  start, end: [B] int32, each row's real keys (partial blocks only).  Returns
    [B, Hq, n, D], a view of a [B, n, Hq, D] tensor.  block_n / num_warps / num_stages /
    reverse override the launch parameters (tuning, tests).  residual: (k_mean, v_mean,
    log_count, table) of flexwalk.kernels.residual (block_summaries over the table's key blocks, and
    the [B, nq', nb'] bool selection table): each query also attends the summaries of the key
    blocks before its query block that the table does not keep.  smem: shared memory bytes to
    plan the tiles for (None: the device's).
    """
    bsz, hq, n, d = q.shape
    out = _launch(q, k, v, torch.empty(bsz, n, hq, d, device=q.device, dtype=q.dtype), full_num, full_idx, part_num,
                  part_idx, start, end, n, q_block=q_block, kv_block=kv_block, scale=scale, block_n=block_n,
                  num_warps=num_warps, num_stages=num_stages, reverse=reverse, residual=residual, smem=smem)
    return out.transpose(1, 2)


def packed_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    full_num: torch.Tensor,
    full_idx: torch.Tensor,
    part_num: torch.Tensor,
    part_idx: torch.Tensor,
    shift: torch.Tensor,
    seq_end: torch.Tensor,
    length: int,
    *,
    q_block: int,
    kv_block: int,
    scale: float | None = None,
    smem: int | None = None,
) -> torch.Tensor:
    """Causal attention of a packed batch (FlashAttention's varlen layout) over the listed key
    blocks, read and written in place: no block-aligned copy.

    q: [total, Hq, D]; k, v: [total, Hkv, D].  The block lists are those of the batch's
    *block-aligned* layout of `length` positions (each sequence starting at a multiple of
    q_block, as `flexwalk.varlen.PackedLayout` places it): full_num / part_num [1, nq'] int32,
    full_idx / part_idx [1, nq', W] int32 (aligned key block ids; every listed block belongs to
    its query block's sequence).  shift, seq_end: [nq'] int32 per query block, its sequence's
    aligned start minus its packed start, and its aligned end (keys and queries at or past it
    are not read).  Returns [total, Hq, D]."""
    total, hq, d = q.shape
    as4 = [t.transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, total, D] views
    out = torch.empty(1, total, hq, d, device=q.device, dtype=q.dtype)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    end = torch.full((1,), length, dtype=torch.int32, device=q.device)
    out = _launch(*as4, out, full_num, full_idx, part_num, part_idx, zero, end, length, q_block=q_block,
                  kv_block=kv_block, scale=scale, smem=smem, packed=(shift, seq_end))
    return out[0]


def _launch(q, k, v, out, full_num, full_idx, part_num, part_idx, start, end, n: int, *, q_block: int,
            kv_block: int, scale=None, block_n=None, num_warps=None, num_stages=None, reverse: bool = True,
            residual=None, smem=None, packed=None) -> torch.Tensor:
    """Check and launch the kernel over n query positions, writing out ([B, rows, Hq, D]);
    packed: (shift, seq_end) of `packed_prefill_attention`."""
    if not HAS_TRITON:
        raise RuntimeError("sparse_prefill_attention needs triton (pip install triton)")
    if q.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"sparse_prefill_attention runs on CUDA; got a {q.device.type} tensor (CPU runs only under triton's "
            "interpreter: set TRITON_INTERPRET=1 before importing triton, as the tests do)"
        )
    bsz, hq, _, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    smem = smem or device_smem(q.device)
    if not supported(q, q_block=q_block, kv_block=kv_block, smem=smem):
        raise ValueError(
            f"head_dim={d}, q_block={q_block}, kv_block={kv_block}, dtype={q.dtype}: need a power-of-two head dim "
            "16..256, power-of-two blocks with 16 <= kv_block <= q_block <= 256, a float16/bfloat16/float32 dtype "
            f"and tiles that fit {smem} bytes of shared memory"
        )
    if packed is not None and residual is not None:
        raise ValueError("residual summaries are not supported on a packed batch")
    block_m, bn, warps, stages = launch_config(q.dtype, d, q_block, kv_block, smem)
    bn = min(block_n or bn, kv_block)
    nq = -(-n // block_m)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    start = start.reshape(bsz).to(torch.int32)
    end = end.reshape(bsz).to(torch.int32)
    scale = d ** -0.5 if scale is None else float(scale)
    if residual is not None:
        k_mean, v_mean, log_count, table = residual
        if k_mean.stride(-1) != 1 or v_mean.stride(-1) != 1:
            k_mean, v_mean = k_mean.contiguous(), v_mean.contiguous()
        tbl = table.reshape(bsz, table.shape[-2], table.shape[-1])
        tbl = tbl.view(torch.uint8) if tbl.dtype == torch.bool else tbl.to(torch.uint8)
        res_strides = (k_mean.stride(0), k_mean.stride(1), k_mean.stride(2), v_mean.stride(0), v_mean.stride(1),
                       v_mean.stride(2), log_count.stride(0), tbl.stride(0), tbl.stride(1))
    else:
        k_mean = v_mean = log_count = tbl = q  # unused (RESIDUAL is off)
        res_strides = (0,) * 9
    shift, seq_end = packed if packed is not None else (start, end)  # unused unless PACKED
    meta = dict(D=d, BLOCK_M=block_m, BLOCK_N=bn, KV_BLOCK=kv_block, M_SPLIT=q_block // block_m, REVERSE=reverse,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", RESIDUAL=residual is not None,
                PACKED=packed is not None, num_warps=num_warps or warps, num_stages=num_stages or stages)
    entry = stats.log_launch("triton_prefill", meta)  # before the launch: a failed one is logged too
    kernel = _jit[(bsz * hq, nq)](
        q, k, v, out, full_num, full_idx, part_num, part_idx, start, end, k_mean, v_mean, log_count, tbl,
        shift, seq_end,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        full_num.stride(0), full_num.stride(-1), full_idx.stride(0), full_idx.stride(-2),
        part_num.stride(0), part_num.stride(-1), part_idx.stride(0), part_idx.stride(-2), *res_strides,
        hq, hq // hkv, n, nq, scale * LOG2E, **meta,
    )
    if entry is not None:
        entry["shared"] = getattr(getattr(kernel, "metadata", None), "shared", None)
    return out


def block_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, start: torch.Tensor,
                         end: torch.Tensor, **kw) -> torch.Tensor:
    """`sparse_prefill_attention` over a BlockMask's block lists (full and partial) and blocks
    (BLOCK_SIZE = (q_block, kv_block)); keyword arguments pass through (scale, launch parameters)."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    return sparse_prefill_attention(q, k, v, block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                                    block_mask.kv_num_blocks, block_mask.kv_indices, start, end, q_block=q_block,
                                    kv_block=kv_block, **kw)
