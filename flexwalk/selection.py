"""ALGORITHM.md steps 1-7: q, k of one layer (+ the walk state) -> BlockSelection.

This is the one function both the compiled flex path and the eager oracle call, so the two
can only differ in how they attend, never in what they select.  `layer_sketch` (steps 1-5)
is shared with the decode state (decode.py), which starts from a prefill's block sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import SketchWalkConfig
from .sketch import (
    block_causal_mask,
    block_means,
    block_scores,
    effective_sketch_dim,
    exact_sketch,
    is_exact,
    num_blocks,
    sketch_seed,
    srht_matrix,
)
from .walk import BlockSelection, WalkState, select_blocks, transition_matrix, walk_combine


@dataclass(frozen=True)
class LayerSketch:
    """Steps 1-5 of one layer: block means, sketches and the block transition matrix.

    Head dims are explicit: 1 for head_scoring="mean", the model's heads for "per_head".
    q_means: [B, Hq', nb, D], k_means: [B, Hk', nb, D] fp32; counts: [B, nb] valid tokens per
    block; k_sketch: [B, Hk', nb, r]; transition: [B, nb, nb] (W_l, head-averaged);
    allowed: [B, nb, nb] causal/valid block pairs; block_valid: [B, nb].
    """

    q_means: torch.Tensor
    k_means: torch.Tensor
    counts: torch.Tensor
    k_sketch: torch.Tensor
    transition: torch.Tensor
    allowed: torch.Tensor
    block_valid: torch.Tensor


def sketch_matrix(config: SketchWalkConfig, layer_idx: int, head_dim: int, device) -> torch.Tensor:
    """The layer's SRHT matrix P [head_dim, r]; at full width (r = the padded head dim, the
    default) the exact sketch [I 0] (sketch.exact_sketch), which every layer shares: the
    scores a random rotation would give, without its rounding or its product (the Triton
    selection skips it)."""
    r = effective_sketch_dim(head_dim, config.sketch_dim)
    if is_exact(head_dim, r):
        return exact_sketch(head_dim, device)
    return srht_matrix(head_dim, r, sketch_seed(config.seed, layer_idx), device)


def head_reduce(x: torch.Tensor, head_scoring: str) -> torch.Tensor:
    """[B, H, n, D] -> fp32 [B, 1, n, D] ("mean") or [B, H, n, D] ("per_head" scoring).

    One head is its own mean: returned as is (fp32), no copy (the CUDA-graph selection passes
    head means it computed already)."""
    return x.float().mean(1, keepdim=True) if head_scoring == "mean" and x.shape[1] > 1 else x.float()


def transition_rows(
    q_sketch: torch.Tensor, k_sketch: torch.Tensor, allowed: torch.Tensor, scale: float, exponent: float
) -> torch.Tensor:
    """Rows of W = softmax(s * A) averaged over heads.

    q_sketch: [B, Hq', m, r]; k_sketch: [B, Hk', nk, r] (Hq' a multiple of Hk');
    allowed: [B, m, nk] bool.  Returns [B, m, nk] fp32.
    """
    bsz, hq, m, r = q_sketch.shape
    hk = k_sketch.shape[1]
    qs = q_sketch.reshape(bsz, hk, (hq // hk) * m, r)
    a = torch.matmul(qs, k_sketch.transpose(-1, -2)).reshape(bsz, hq, m, -1) * scale
    a = a.masked_fill(~allowed[:, None], float("-inf"))
    return transition_matrix(a, exponent).mean(1)


def layer_sketch(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    p: torch.Tensor | None = None,
    process_group=None,
) -> LayerSketch:
    """Steps 1-5 for one prefill layer (q [B, Hq, n, D], k [B, Hkv, n, D]); no host sync.

    p: the layer's SRHT matrix (sketch_matrix), when the caller holds it already.
    process_group: tensor parallelism, each rank holding an equal share of the heads: the
    head-mean block means (head_scoring="mean") or the head-mean transition ("per_head") are
    averaged over the group with one all-reduce of [B, nb, D] or [B, nb, nb] per layer, so
    every rank selects exactly what one process holding every head would."""
    bsz, hq, n, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    if p is None:
        p = sketch_matrix(config, layer_idx, d, q.device)
    qb, counts = block_means(head_reduce(q, config.head_scoring), config.block_size, key_valid)  # [B, Hq', nb, D]
    kb, _ = block_means(head_reduce(k, config.head_scoring), config.block_size, key_valid)  # [B, Hk', nb, D]
    if counts.shape[0] != bsz:
        counts = counts.expand(bsz, -1)
    if process_group is not None and config.head_scoring == "mean":
        qb, kb = _group_mean(qb, process_group), _group_mean(kb, process_group)
    block_valid = counts > 0  # [B, nb]
    allowed = block_causal_mask(block_valid)
    ks = kb @ p
    w = transition_rows(qb @ p, ks, allowed, scale, config.sparsity_exponent)
    if process_group is not None and config.head_scoring == "per_head":
        w = _group_mean(w, process_group)
    return LayerSketch(qb, kb, counts, ks, w, allowed, block_valid)


def _group_mean(x: torch.Tensor, group) -> torch.Tensor:
    """Mean of x over the ranks of a process group (one all-reduce; equal head shares per rank)."""
    import torch.distributed as dist

    x = x.contiguous()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x / dist.get_world_size(group)


def oracle_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Exact block attention mass, the 'oracle' selection's score (an evaluation upper bound).

    Entry [b, i, j]: the causal softmax attention of the real queries of block i on the keys of
    block j, summed over those queries, averaged over query heads, rows normalised to 1.
    O(n^2) work, computed in chunks of `chunk` query rows: memory is B x Hq x chunk x n, never
    n x n.  Returns [B, nb, nb] fp32.
    """
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    nb = num_blocks(n, block_size)
    chunk = max(block_size, chunk // block_size * block_size)
    valid = torch.ones(bsz, n, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.bool()
    kf = k.float().repeat_interleave(hq // hkv, dim=1)  # [B, Hq, n, D]
    keys = torch.arange(n, device=q.device)
    mass = torch.zeros(bsz, nb, nb, device=q.device)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        scores = torch.matmul(q[:, :, s0:s1].float(), kf.transpose(-1, -2)) * scale  # [B, Hq, c, n]
        rows = torch.arange(s0, s1, device=q.device)
        allowed = (keys[None, :] <= rows[:, None])[None] & valid[:, None, :] & valid[:, s0:s1, None]  # [B, c, n]
        probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
        per_key_block = F.pad(probs.mean(1), (0, nb * block_size - n)).reshape(bsz, s1 - s0, nb, block_size).sum(-1)
        qb0 = s0 // block_size
        rows_pad = -(-(s1 - s0) // block_size) * block_size
        summed = F.pad(per_key_block, (0, 0, 0, rows_pad - (s1 - s0))).reshape(bsz, -1, block_size, nb).sum(2)
        mass[:, qb0 : qb0 + summed.shape[1]] += summed
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)


def select(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
    prev_walk: torch.Tensor | None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    sketch: LayerSketch | None = None,
    p: torch.Tensor | None = None,
    process_group=None,
    seq_len: torch.Tensor | None = None,
) -> tuple[BlockSelection, torch.Tensor]:
    """Steps 1-7 on tensors only: (selection, walk matrix R_l).  prev_walk: R_{l-1} or None.

    The one selection rule of the eager path (sketchwalk_selection) and of the fused,
    compiled or CUDA-graphed prefill path (attention._selection_tables).  seq_len: a 0-d
    tensor of real tokens when q, k are padded to a bucket (key_valid False past it)."""
    n = q.shape[2] if seq_len is None else seq_len
    if sketch is None:
        sketch = layer_sketch(q, k, config, layer_idx, key_valid=key_valid, scale=scale, p=p,
                              process_group=process_group)
    if config.walk == "oracle":
        if process_group is not None:
            raise NotImplementedError("walk='oracle' under tensor parallelism (it needs every head's exact scores)")
        walk = oracle_block_mass(q, k, config.block_size, key_valid=key_valid, scale=scale).masked_fill(
            ~sketch.allowed, 0.0)
    else:
        walk = walk_combine(sketch.transition, prev_walk, sketch.transition, config.walk, config.damping,
                            config.walk_steps)
    return select_blocks(walk, sketch.allowed, sketch.block_valid, config, n), walk


def sketchwalk_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
    state: WalkState | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    sketch: LayerSketch | None = None,
    process_group=None,
) -> tuple[BlockSelection, WalkState]:
    """Select key blocks for one prefill layer.

    q: [B, Hq, n, D], k: [B, Hkv, n, D] (post-RoPE, any float dtype; the math runs in fp32).
    key_valid: [B, n] bool, False at padding tokens (they never enter a block mean and are
    never selected on their own).  scale: the layer's softmax scale (default 1/sqrt(D)).
    sketch: this layer's `layer_sketch(...)` when the caller already has it.  process_group:
    tensor parallelism (see layer_sketch): every rank of the group gets the same selection.
    Returns the selection and the walk state for the next sparse layer.
    """
    bsz, _, n, _ = q.shape
    bs = config.block_size
    if state is not None:
        state.check_compatible(bsz, n, bs)
    selection, walk = select(q, k, config, layer_idx, None if state is None else state.transition,
                             key_valid=key_valid, scale=scale, sketch=sketch, process_group=process_group)
    return selection, WalkState(transition=walk, layer_idx=layer_idx, block_size=bs, seq_len=n)
