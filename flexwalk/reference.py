"""Eager reference: the same block selection expanded to a dense token mask, run through SDPA.

This module defines the semantics the fast path must reproduce.  It builds n x n tensors on
purpose and is meant for tests and small inputs only.
"""

from __future__ import annotations

import torch

from .config import SketchWalkConfig
from .kernels.dense import masked_attention
from .kernels.flex import row_bounds
from .kernels.residual import block_summaries, residual_allowed
from .selection.driver import sketchwalk_selection
from .selection.topk import BlockSelection
from .selection.walk import WalkState


def token_mask(
    seq_len: int,
    *,
    batch: int = 1,
    selection: BlockSelection | None = None,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
    rows: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """[B, 1, n, n] bool: causal (+window) (+padding, a padding query sees itself) (+selection).
    rows: the query positions to build ([R] int64): [B, 1, R, n], the same rows of the full mask
    (for long prompts, whose n x n mask would not fit)."""
    if selection is not None:
        device = selection.mask.device
        batch = selection.mask.shape[0]
    pos = torch.arange(seq_len, device=device)
    q = (pos if rows is None else rows.to(pos.device))[:, None]
    kv = pos[None, :]
    m = (kv <= q)[None].expand(batch, -1, -1)
    if window is not None:
        m = m & (kv > q - window)
    if key_valid is not None:
        m = (m & key_valid[:, None, :]) | (kv == q)[None]
    if selection is not None:
        blk = selection.mask[:, q[:, 0] // selection.q_block_size][:, :, pos // selection.block_size]
        m = m & blk
    return m[:, None]


def reference_attention(q, k, v, mask, *, scale=None, softcap=None) -> torch.Tensor:
    """Attention of q [B,Hq,L,D], k/v [B,Hkv,S,D] under a dense bool mask [B,1,L,S]."""
    return masked_attention(q, k, v, mask, scale=scale, softcap=softcap)


def error_budget(out, ref_lp, ref_hp, *, factor: float = 2.0, extra: float = 0.0) -> tuple[float, float]:
    """(error of `out`, allowed error) against references computed in out's dtype (ref_lp) and in
    float64 (ref_hp), as FlashAttention's tests allow: `factor` times the same-dtype reference's
    own error, plus 4 ulps of the output's magnitude, plus `extra`.  The allowance follows the
    dtype and the inputs; no tolerance is tuned by hand."""
    err_ref = (ref_lp.double() - ref_hp).abs().max().item()
    err_out = (out.double() - ref_hp).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * max(1.0, ref_hp.abs().max().item())
    return err_out, factor * err_ref + 4 * ulp + extra


def reference_error_budget(q, k, v, mask, out, *, scale=None, softcap=None, factor: float = 2.0) -> tuple[float, float]:
    """(error of `out`, allowed error) for attention of q, k, v under `mask` (`reference_attention`
    in q's dtype and in float64, then `error_budget`).  q and out may hold a subset of the query
    rows, with the mask of those rows (`token_mask(..., rows=...)`)."""
    ref_lp = reference_attention(q, k, v, mask, scale=scale, softcap=softcap)
    ref_hp = reference_attention(q.double(), k.double(), v.double(), mask, scale=scale, softcap=softcap)
    # soft-capping evaluates softcap * tanh(s / softcap) in the dtype: each score carries about
    # softcap * eps of rounding, which moves the output by up to that times max |v|.
    capped = 0.0 if softcap is None else softcap * torch.finfo(q.dtype).eps * v.abs().max().item()
    return error_budget(out, ref_lp, ref_hp, factor=factor, extra=capped)


def sample_rows(n: int, count: int = 256, device=None) -> torch.Tensor:
    """[R] int64 query rows to check a long prompt on: every row up to `count`, else `count`
    rows spread over the prompt, the first and the last 16 (the dense tail) among them."""
    if n <= count:
        return torch.arange(n, device=device)
    spread = torch.linspace(0, n - 1, count - 16, device=device).round().long()
    return torch.unique(torch.cat([spread, torch.arange(n - 16, n, device=device)]))


def rows_error_budget(q, k, v, out, mask_of, rows: torch.Tensor, *, chunk: int | None = None, scale=None,
                      softcap=None) -> tuple[float, float]:
    """`reference_error_budget` of `out` on the query `rows` only, `chunk` rows at a time (the
    float64 reference holds [B, Hq, chunk, n] scores; None: 2 GiB of them), where mask_of(r)
    gives the rows' mask [B, 1, len(r), n] (`token_mask(..., rows=r)`).  Returns the (error,
    budget) of the chunk with the largest error against its budget."""
    bsz, hq, n, _ = q.shape
    chunk = chunk or max(1, 2**31 // (bsz * hq * n * 8))
    worst = (0.0, 1.0)
    for i in range(0, len(rows), chunk):
        r = rows[i:i + chunk]
        err, budget = reference_error_budget(q[:, :, r], k, v, mask_of(r), out[:, :, r], scale=scale, softcap=softcap)
        if err / budget > worst[0] / worst[1]:
            worst = (err, budget)
    return worst


def residual_reference(q, k, v, mask, selection: BlockSelection, *, key_valid=None, scale=None,
                       softcap=None) -> torch.Tensor:
    """Attention under the dense token mask plus the residual's summary entries (flexwalk.kernels.residual):
    the summaries appended to the keys and values, their logits raised by log(count), all in one
    float32 softmax (float64 for float64 inputs).  Rows with nothing to attend return 0."""
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    bs = selection.block_size
    start, end = row_bounds(bsz, n, key_valid, q.device)
    k_mean, v_mean, log_count = block_summaries(k, v, start, end, bs, key_valid=key_valid)
    allowed = residual_allowed(selection.mask, log_count, torch.arange(n, device=q.device),
                               selection.q_block_size, bs)  # [B, n, nb]
    acc = torch.promote_types(q.dtype, torch.float32)
    kk = torch.cat([k, k_mean], 2).to(acc).repeat_interleave(g, 1)
    vv = torch.cat([v, v_mean], 2).to(acc).repeat_interleave(g, 1)
    s = (q.to(acc) @ kk.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s[..., n:] += log_count[:, None, None, :].to(acc)
    full = torch.cat([mask.expand(bsz, 1, n, n), allowed[:, None]], -1)
    s = s.masked_fill(~full, float("-inf"))
    out = torch.softmax(s, -1).nan_to_num(0.0) @ vv
    return out.to(q.dtype)


def eager_sketchwalk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
    state: WalkState | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, WalkState, BlockSelection]:
    """Oracle of one sparse layer: (out, state, selection) with a dense token mask and SDPA (and,
    with config.residual, the residual's summaries: `residual_reference`)."""
    selection, new_state = sketchwalk_selection(q, k, config, layer_idx, state, key_valid=key_valid, scale=scale)
    mask = token_mask(q.shape[2], selection=selection, key_valid=key_valid)
    if config.uses_residual:
        out = residual_reference(q, k, v, mask, selection, key_valid=key_valid, scale=scale, softcap=softcap)
        return out, new_state, selection
    return reference_attention(q, k, v, mask, scale=scale, softcap=softcap), new_state, selection
