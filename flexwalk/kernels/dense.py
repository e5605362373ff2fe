"""Exact (dense) attention: causal with windows, padding and soft-capping (`dense_attention`), or
under an explicit mask (`masked_attention`), without building an n x n mask where none is given."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flex import dense_block_mask, flex


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    q_offset: int = 0,
    block_size: int = 128,
) -> torch.Tensor:
    """Exact causal attention (+window, +padding, +softcap) without any n x n tensor.

    Plain causal attention goes to SDPA (flash / cuDNN on GPU); anything with a mask or
    soft-capping goes to compiled flex with a dense BlockMask.
    """
    L, S = q.shape[2], k.shape[2]
    if key_valid is None and softcap is None and window is None and q_offset == 0 and L == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    bm = dense_block_mask(
        q.shape[0], L, S, block_size, q.device, key_valid=key_valid, q_offset=q_offset, window=window
    )
    return flex(q, k, v, bm, scale=scale, softcap=softcap, block_size=block_size)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention with an explicit mask [B or 1, 1 or Hq, L, S]: bool (True: attend), or float,
    added to the (soft-capped) logits as SDPA adds it.  Decode passes one row (L = 1).

    Rows with no allowed key (all False, or all -inf) return 0 instead of NaN.
    """
    g = q.shape[1] // k.shape[1]
    boolean = mask.dtype == torch.bool
    if not boolean and not mask.is_floating_point():
        raise ValueError(f"attention mask must be bool or floating point, got {mask.dtype}")
    if softcap is None:
        m = mask if boolean else mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=g != 1)
    else:
        kk = k.repeat_interleave(g, 1) if g != 1 else k
        vv = v.repeat_interleave(g, 1) if g != 1 else v
        s = (q.float() @ kk.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, float("-inf")) if boolean else s + mask.float()
        out = (torch.softmax(s, -1).nan_to_num(0.0) @ vv.float()).to(q.dtype)
    live = mask.any(-1, keepdim=True) if boolean else (mask > float("-inf")).any(-1, keepdim=True)
    return torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))
