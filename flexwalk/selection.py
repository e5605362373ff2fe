"""ALGORITHM.md steps 1-7: q, k of one layer (+ the walk state) -> BlockSelection.

This is the one function both the compiled flex path and the eager oracle call, so the two
can only differ in how they attend, never in what they select.
"""

from __future__ import annotations

import torch

from .config import SketchWalkConfig
from .sketch import (
    block_causal_mask,
    block_means,
    block_scores,
    effective_sketch_dim,
    sketch_seed,
    srht_matrix,
)
from .walk import BlockSelection, WalkState, select_blocks, transition_matrix, walk_step


def sketchwalk_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
    state: WalkState | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[BlockSelection, WalkState]:
    """Select key blocks for one prefill layer.

    q: [B, Hq, n, D], k: [B, Hkv, n, D] (post-RoPE, any float dtype; the math runs in fp32).
    key_valid: [B, n] bool, False at padding tokens (they never enter a block mean and are
    never selected on their own).  scale: the layer's softmax scale (default 1/sqrt(D)).
    Returns the selection and the walk state for the next sparse layer.
    """
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    bs = config.block_size
    if state is not None:
        state.check_compatible(bsz, n, bs)
    scale = d**-0.5 if scale is None else float(scale)
    r = effective_sketch_dim(d, config.sketch_dim)
    p = srht_matrix(d, r, sketch_seed(config.seed, layer_idx), q.device)

    if config.head_scoring == "mean":
        qb, counts = block_means(q.float().mean(1), bs, key_valid)  # [B, nb, D]
        kb, _ = block_means(k.float().mean(1), bs, key_valid)
    else:
        qb, counts = block_means(q, bs, key_valid)  # [B, Hq, nb, D]
        kb, _ = block_means(k, bs, key_valid)  # [B, Hkv, nb, D]
        kb = kb.repeat_interleave(hq // hkv, dim=1)
    block_valid = counts > 0  # [B, nb]
    if block_valid.shape[0] != bsz:
        block_valid = block_valid.expand(bsz, -1)
    allowed = block_causal_mask(block_valid)
    scores = block_scores(qb @ p, kb @ p, scale, allowed)
    w = transition_matrix(scores, config.sparsity_exponent)
    if w.dim() == 4:  # per-head transitions, averaged: the selection stays shared
        w = w.mean(1)
    walk = walk_step(w, state, config)
    selection = select_blocks(walk, allowed, block_valid, config, n)
    return selection, WalkState(transition=walk, layer_idx=layer_idx, block_size=bs, seq_len=n)
