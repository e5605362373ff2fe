"""Eager reference: the same block selection expanded to a dense token mask, run through SDPA.

This module defines the semantics the fast path must reproduce.  It builds n x n tensors on
purpose and is meant for tests and small inputs only.
"""

from __future__ import annotations

import torch

from .attention import masked_attention
from .config import SketchWalkConfig
from .selection import sketchwalk_selection
from .walk import BlockSelection, WalkState


def token_mask(
    seq_len: int,
    *,
    batch: int = 1,
    selection: BlockSelection | None = None,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
    device=None,
) -> torch.Tensor:
    """[B, 1, n, n] bool: causal (+window) (+padding, a padding query sees itself) (+selection)."""
    if selection is not None:
        device = selection.mask.device
        batch = selection.mask.shape[0]
    pos = torch.arange(seq_len, device=device)
    q, kv = pos[:, None], pos[None, :]
    m = (kv <= q)[None].expand(batch, -1, -1)
    if window is not None:
        m = m & (kv > q - window)
    if key_valid is not None:
        m = (m & key_valid[:, None, :]) | (kv == q)[None]
    if selection is not None:
        blk = selection.mask[:, pos // selection.q_block_size][:, :, pos // selection.block_size]
        m = m & blk
    return m[:, None]


def reference_attention(q, k, v, mask, *, scale=None, softcap=None) -> torch.Tensor:
    """Attention of q [B,Hq,L,D], k/v [B,Hkv,S,D] under a dense bool mask [B,1,L,S]."""
    return masked_attention(q, k, v, mask, scale=scale, softcap=softcap)


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
    """Oracle of one sparse layer: (out, state, selection) with a dense token mask and SDPA."""
    selection, new_state = sketchwalk_selection(q, k, config, layer_idx, state, key_valid=key_valid, scale=scale)
    mask = token_mask(q.shape[2], selection=selection, key_valid=key_valid)
    return reference_attention(q, k, v, mask, scale=scale, softcap=softcap), new_state, selection
