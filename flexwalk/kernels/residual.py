"""The residual: unselected key blocks, each summarised by its mean key and mean value.

Top-k selection drops the key blocks it does not keep.  Each of them held a little attention;
together they can hold much of it (a query in a long, repetitive context spreads its mass
thinly over many similar blocks), and dropping them all shifts each softmax toward the kept
blocks.  With `SketchWalkConfig.residual` every query also attends, for each whole key block j
before its query block that the selection did not keep, one summary entry:

    key  = mean of the block's real keys,   value = mean of their values,
    logit = scale * q . key + log(count of real keys in the block)

so that the entry's weight, exp(logit), is count * exp(scale * q . mean key): the block's
softmax mass if its keys were all equal to their mean (a first-order estimate; Jensen makes it
a slight under-estimate).  Selected blocks keep their exact tokens; the summaries only stand
in for what was dropped.  The extra work is one entry per block (1 / block_size of dense
attention), and the summaries cost one pass over K and V per layer.

Here: `block_summaries` (each block's mean key, mean value and log count, one pass over K
and V, shared by every path) and `residual_allowed` (which summaries a query attends).  The
Triton prefill kernel reads the summaries in a loop of its own
(triton_prefill.sparse_prefill_attention); the flex path appends them to the keys and values
of the same call, with a mask_mod and a score_mod for them (`residual_flex`); the
reference (reference.residual_reference) appends them to the dense reference's keys.  Decode steps do
not use the residual (a log line says so once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from ..config import SketchWalkConfig
from ..selection.sketch import block_means
from .flex import block_mask_from_indices, flex, make_mask_mod, packed, padded_validity, softcap_score_mod
from .triton_runtime import HAS_TRITON, interpreted

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _summary_kernel(K, V, KM, VM, LC, START, END, skb, skh, skn, svb, svh, svn, smb, smh, smn, snb, snh, snn,
                        slb, HKV, N, BS: tl.constexpr, CH: tl.constexpr, D: tl.constexpr):
        """Program (b * HKV + h, j): key block j's mean key and value over its real keys, and
        (head 0) log(count)."""
        pid = tl.program_id(0)
        j = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        start = tl.load(START + b)
        end = tl.load(END + b)
        offs_d = tl.arange(0, D)
        k_sum = tl.zeros([D], tl.float32)
        v_sum = tl.zeros([D], tl.float32)
        cnt = 0.0
        for c in tl.static_range(0, BS, CH):
            toks = j * BS + c + tl.arange(0, CH)
            real = (toks >= start) & (toks < end) & (toks < N)
            k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + toks[:, None].to(tl.int64) * skn
                        + offs_d[None, :], mask=real[:, None], other=0.0)
            v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + toks[:, None].to(tl.int64) * svn
                        + offs_d[None, :], mask=real[:, None], other=0.0)
            k_sum += tl.sum(k.to(tl.float32), 0)
            v_sum += tl.sum(v.to(tl.float32), 0)
            cnt += tl.sum(real.to(tl.float32), 0)
        denom = tl.maximum(cnt, 1.0)
        tl.store(KM + b.to(tl.int64) * smb + h.to(tl.int64) * smh + j.to(tl.int64) * smn + offs_d,
                 (k_sum / denom).to(KM.dtype.element_ty))
        tl.store(VM + b.to(tl.int64) * snb + h.to(tl.int64) * snh + j.to(tl.int64) * snn + offs_d,
                 (v_sum / denom).to(VM.dtype.element_ty))
        if h == 0:
            tl.store(LC + b * slb + j, tl.where(cnt > 0, tl.log(denom), float("-inf")))

def block_summaries(k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor, block_size: int,
                    num_blocks: int | None = None, *, key_valid: torch.Tensor | None = None,
                    kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each key block's mean key and mean value over its real keys, and log(count).

    k, v: [B, Hkv, n, D]; start, end: [B] int, each row's real keys.  num_blocks: blocks to
    return (default ceil(n / block_size); more gives empty blocks past n).  key_valid: [B, n]
    bool, for padding with holes inside [start, end) (then torch ops, not the kernel).  Returns
    (k_mean [B, Hkv, nb, D], v_mean [B, Hkv, nb, D], both in k's dtype, and log_count [B, nb]
    float32, -inf for blocks without a real key).  Means are accumulated in float32 (float64
    inputs in float64).  kernel: "auto" (the Triton kernel for CUDA tensors where triton is
    installed), "triton" (also CPU tensors, through triton's interpreter) or "torch"
    (Options.summary_kernel).
    """
    bsz, hkv, n, d = k.shape
    nb = -(-n // block_size) if num_blocks is None else num_blocks
    if nb * block_size < n:
        raise ValueError(f"num_blocks={nb} blocks of {block_size} do not cover the {n} keys")
    if key_valid is None and _use_kernel(k, d, kernel):  # the kernel knows [start, end) only
        k_mean = torch.empty(bsz, hkv, nb, d, device=k.device, dtype=k.dtype)
        v_mean = torch.empty(bsz, hkv, nb, d, device=k.device, dtype=v.dtype)
        log_count = torch.empty(bsz, nb, device=k.device, dtype=torch.float32)
        start32, end32 = start.reshape(bsz).to(torch.int32), end.reshape(bsz).to(torch.int32)
        _summary_kernel[(bsz * hkv, nb)](
            k, v, k_mean, v_mean, log_count, start32, end32, k.stride(0), k.stride(1), k.stride(2), v.stride(0),
            v.stride(1), v.stride(2), k_mean.stride(0), k_mean.stride(1), k_mean.stride(2), v_mean.stride(0),
            v_mean.stride(1), v_mean.stride(2), log_count.stride(0), hkv, n, BS=block_size,
            CH=min(block_size, 4096 // d), D=d, num_warps=4)
        return k_mean, v_mean, log_count
    pos = torch.arange(n, device=k.device)
    real = (pos[None] >= start.to(pos.dtype)[:, None]) & (pos[None] < end.to(pos.dtype)[:, None])  # [B, n]
    if key_valid is not None:
        real = real & key_valid[:, :n]
    (k_mean, counts), (v_mean, _) = (block_means(t, block_size, real) for t in (k, v))
    extra = nb - counts.shape[1]  # blocks past n: empty
    counts = F.pad(counts, (0, extra))
    log_count = torch.where(counts > 0, counts.log(), torch.full_like(counts, float("-inf")))
    return F.pad(k_mean, (0, 0, 0, extra)).to(k.dtype), F.pad(v_mean, (0, 0, 0, extra)).to(v.dtype), log_count


def _use_kernel(k: torch.Tensor, d: int, kernel: str) -> bool:
    if kernel == "torch" or not HAS_TRITON or d & (d - 1) or k.stride(-1) != 1:
        return False
    if kernel == "triton":
        return k.is_cuda or interpreted()
    return k.is_cuda


def residual_allowed(table: torch.Tensor, log_count: torch.Tensor, rows: torch.Tensor, q_block: int,
                     block_size: int) -> torch.Tensor:
    """[B, len(rows), nb] bool: the summaries query positions `rows` attend: key blocks wholly
    before the query's block (of q_block rows) that its selection row does not keep and that
    hold a real key.  table: [B, nq, >= nb] bool selection (query blocks of q_block tokens)."""
    nb = log_count.shape[1]
    qrow = rows // q_block
    first = qrow * (q_block // block_size)  # key blocks strictly before the query block
    j = torch.arange(nb, device=rows.device)
    before = j[None, :] < first[:, None]  # [rows, nb]
    kept = table[:, qrow, :nb]  # [B, rows, nb]
    return before[None] & ~kept & torch.isfinite(log_count)[:, None, :]


def residual_flex(q, k, v, bm: BlockMask, res: tuple, config: SketchWalkConfig, start, end, tiles,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Compiled flex over the selection plus the residual's summaries (flexwalk.kernels.residual), in one
    call: the summaries are appended to the keys and values after the bucket's n_pad tokens
    (nb of them, in ceil(nb / block_size) extra key blocks), each query block's partial list
    gains the summary blocks before it, the mask_mod admits summary j for query q when key
    block j lies wholly before q's query block, was not selected and holds a real key, and
    the score_mod adds log(count) to the summaries' logits.  valid: [B, n] key validity, for
    padding with holes."""
    k_mean, v_mean, log_count, table = res
    bs, qb = config.block_size, config.q_block
    n = k.shape[2]
    n_pad = bm.seq_lengths[0]
    nbp = table.shape[-1]  # key blocks of the bucket (n_pad / bs)
    extra_blocks = -(-nbp // bs)
    kk = torch.cat([F.pad(k, (0, 0, 0, n_pad - n)), F.pad(k_mean, (0, 0, 0, extra_blocks * bs - nbp))], 2)
    vv = torch.cat([F.pad(v, (0, 0, 0, n_pad - n)), F.pad(v_mean, (0, 0, 0, extra_blocks * bs - nbp))], 2)
    p_cnt, p_idx = bm.kv_num_blocks[:, 0], bm.kv_indices[:, 0]
    nq, width = p_idx.shape[1], p_idx.shape[2]
    rows = torch.arange(nq, device=q.device)
    extra = -(-(rows * (qb // bs)) // bs)  # summary blocks holding the key blocks before each query block
    pos = torch.arange(width + extra_blocks, device=q.device)
    rel = pos[None, None, :] - p_cnt[..., None]
    use = (rel >= 0) & (rel < extra[None, :, None])
    idx = torch.where(use, n_pad // bs + rel, F.pad(p_idx, (0, extra_blocks))).to(torch.int32)
    f_idx = F.pad(bm.full_kv_indices[:, 0], (0, extra_blocks))
    tok_mask = make_mask_mod(block_size=bs, q_block=qb, start=packed(start), end=packed(end),
                             block_table=packed(table),
                             valid=None if valid is None else packed(padded_validity(valid, n_pad)))
    has = packed(torch.isfinite(log_count))
    lc = packed(torch.where(torch.isfinite(log_count), log_count, torch.zeros_like(log_count)))
    tbl = packed(table)
    softcap = tiles["softcap"]

    def summary_index(kv_idx):
        """(whether kv_idx is a summary, its key block: 0 where it is not one or past nbp)."""
        summary = kv_idx >= n_pad
        j = torch.where(summary, kv_idx - n_pad, 0)
        return summary, torch.where(j < nbp, j, 0)

    def mask_mod(b, h, q_idx, kv_idx):
        summary, j = summary_index(kv_idx)
        qrow = q_idx // qb
        ok = (j < qrow * (qb // bs)) & ~tbl[b, qrow, j] & has[b, j]
        return torch.where(summary, ok, tok_mask(b, h, q_idx, torch.where(summary, 0, kv_idx)))

    cap = None if softcap is None else softcap_score_mod(float(softcap))

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap(score, b, h, q_idx, kv_idx)
        summary, j = summary_index(kv_idx)
        return score + torch.where(summary, lc[b, j], 0.0)

    rbm = block_mask_from_indices(p_cnt + extra[None].to(p_cnt.dtype), idx, bm.full_kv_num_blocks[:, 0], f_idx,
                                  mask_mod, (qb, bs), n_pad, n_pad + extra_blocks * bs)
    return flex(q, kk, vv, rbm, score_mod=score_mod, **tiles)
