"""Selection, stage 1: the layer's sketch.  q and k of one layer -> block means (head means
first, or per head), SRHT sketches of them and the block transition matrix W_l = softmax(s * A)
over the causal, valid blocks.  The block scores A are the sketched block means' products
(prefill_scoring="sketch"), or each query block's mean against each key block's channel-wise
key extremes, an upper bound on the block's largest logit (prefill_scoring="bound",
`bound_scores`).

Everything here runs in fp32 whatever the model dtype, reads q and k once, and produces
block-level tensors only ([B, nb, D], [B, nb, r], [B, nb, nb]); no token-by-token matrix.
The decode state (flexwalk.decode) starts from a prefill's `LayerSketch`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import SketchWalkConfig
from ..distributed import group_mean


def num_blocks(seq_len: int, block_size: int) -> int:
    return (seq_len + block_size - 1) // block_size


def block_means(x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of x over the valid tokens of each block.

    x: [..., n, D] (any float dtype); valid: [B, n] bool or None (all valid), broadcast over
    the dims between batch and tokens.  Returns (means [..., nb, D] fp32 (fp64 for fp64 x), counts
    [B or 1, nb] fp32 of valid tokens per block).  Padding tokens never enter a mean; a block without
    valid tokens has mean 0 and count 0.
    """
    n, d = x.shape[-2], x.shape[-1]
    nb = num_blocks(n, block_size)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if valid is None:
        valid_f = torch.ones(1, n, device=x.device, dtype=torch.float32)
    else:
        valid_f = valid.to(torch.float32)
    # Broadcast the [B, n] validity over any head dimension sitting between B and n.
    vshape = (valid_f.shape[0],) + (1,) * (x.dim() - 3) + (n, 1)
    xw = x * valid_f.reshape(vshape)
    # Copy into a block-multiple buffer rather than pad: no branch on whether the length is a
    # block multiple, so one compiled graph serves every length (and the sum stays deterministic).
    buf = xw.new_zeros(*xw.shape[:-2], nb * block_size, d)
    buf[..., :n, :] = xw
    sums = buf.reshape(*xw.shape[:-2], nb, block_size, d).sum(-2)
    vbuf = valid_f.new_zeros(valid_f.shape[0], nb * block_size)
    vbuf[:, :n] = valid_f
    counts = vbuf.reshape(valid_f.shape[0], nb, block_size).sum(-1)
    cshape = (counts.shape[0],) + (1,) * (x.dim() - 3) + (nb, 1)
    means = sums / counts.clamp_min(1.0).reshape(cshape).to(sums.dtype)
    return means, counts


def block_key_bounds(k: torch.Tensor, block_size: int, key_valid: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, min) [B, H, nb, D] in k's dtype: the channel-wise extremes of each block's real
    keys (k [B, H, n, D]; key_valid [B, n] bool).  A block with no real key is -inf / +inf."""
    bsz, h, n, d = k.shape
    nb = num_blocks(n, block_size)
    pad = nb * block_size - n
    real = torch.ones(bsz, n, dtype=torch.bool, device=k.device) if key_valid is None else key_valid.bool()
    real = F.pad(real.expand(bsz, n), (0, pad), value=False).reshape(bsz, 1, nb, block_size, 1)
    kb = F.pad(k, (0, 0, 0, pad)).reshape(bsz, h, nb, block_size, d)
    return kb.masked_fill(~real, float("-inf")).amax(3), kb.masked_fill(~real, float("inf")).amin(3)


def bound_product(q: torch.Tensor, k_bounds: torch.Tensor) -> torch.Tensor:
    """[..., m, C] fp32: sum_d max(q_d * max_d, q_d * min_d) for q [..., m, D] against k_bounds
    [..., C, 2D] = [max k, -min k] per block (leading dims broadcast): an upper bound on q . k
    for every key k of the block.  max(q_d max_d, q_d min_d) = relu(q_d) max_d + relu(-q_d)
    (-min_d): one product of [relu(q), relu(-q)] with [max, -min]."""
    q = q.float()
    qc = torch.cat([q.clamp_min(0.0), (-q).clamp_min(0.0)], -1)
    return torch.matmul(qc, k_bounds.float().transpose(-1, -2))


def key_bounds(k: torch.Tensor, block_size: int, key_valid: torch.Tensor | None, head_scoring: str) -> torch.Tensor:
    """prefill_scoring="bound": [B, Hk', nb, 2D] fp32, [max k, -min k] of each block's real keys
    of head_reduce(k) (k [B, Hkv, n, D]); 0 for a block without a real key (never allowed)."""
    kmax, kmin = block_key_bounds(head_reduce(k, head_scoring), block_size, key_valid)
    empty = torch.isinf(kmax[..., :1])  # [B, Hk', nb, 1]: no real key
    return torch.cat([kmax, -kmin], -1).float().masked_fill(empty, 0.0)


def bound_scores(q_means: torch.Tensor, k_bounds: torch.Tensor) -> torch.Tensor:
    """prefill_scoring="bound": [B, Hq', m, nb] fp32 block scores (unscaled), each query block's
    mean q_means [B, Hq', m, D] against each key block's `key_bounds` [B, Hk', nb, 2D] (query
    head h reads KV head h // (Hq' / Hk')).  A needle of a few tokens is averaged away in its
    block's mean key but not in the block's extremes."""
    hq, hk = q_means.shape[1], k_bounds.shape[1]
    if hk != hq:
        k_bounds = k_bounds.repeat_interleave(hq // hk, dim=1)
    return bound_product(q_means, k_bounds)


def _hadamard(n: int) -> torch.Tensor:
    """Sylvester +-1 Walsh-Hadamard matrix of size n (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def padded_dim(head_dim: int) -> int:
    """Dp: the head dim rounded up to a power of two (the Hadamard matrix's size)."""
    return 1 << max(0, math.ceil(math.log2(head_dim)))


def effective_sketch_dim(head_dim: int, sketch_dim: int | None) -> int:
    """The sketch width used: r, at most the head dim padded to a power of two (None: that)."""
    dp = padded_dim(head_dim)
    return dp if sketch_dim is None else min(sketch_dim, dp)


@functools.lru_cache(maxsize=256)
def _srht_cpu(head_dim: int, sketch_dim: int, seed: int) -> torch.Tensor:
    dp = padded_dim(head_dim)
    r = min(sketch_dim, dp)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dp,), generator=gen).float() * 2 - 1
    cols = torch.randperm(dp, generator=gen)[:r].sort().values
    p = signs[:, None] * _hadamard(dp)[:, cols] / math.sqrt(r)
    return p[:head_dim].contiguous()  # zero-padded features contribute nothing: drop their rows


_SRHT_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def is_exact(head_dim: int, r: int) -> bool:
    """Whether a sketch of width r is exact: the padded head dim, where P P^T = I."""
    return r >= padded_dim(head_dim)


def exact_sketch(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The exact sketch P = [I 0], [head_dim, Dp] fp32 (Dp the head dim rounded up to a power
    of two): any full-width P with P P^T = I gives the same scores, (xP).(yP) = x.y, and this
    one gives them without rounding (xP is x, then zeros).  Cached per (shape, device)."""
    key = (head_dim, "exact", str(device))
    p = _SRHT_DEVICE_CACHE.get(key)
    if p is None:
        p = _SRHT_DEVICE_CACHE[key] = torch.eye(head_dim, padded_dim(head_dim)).to(device)
    return p


def srht_matrix(head_dim: int, sketch_dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Subsampled randomized Hadamard transform P, [head_dim, r] fp32, with E[(xP).(yP)] = x.y.

    P = diag(sigma) Hd[:, cols] / sqrt(r) with Hd the Walsh-Hadamard matrix of the head dim
    rounded up to a power of two, sigma random signs and cols r distinct columns, all drawn
    from `seed`.  Cached per (shape, seed, device).
    """
    key = (head_dim, sketch_dim, seed, str(device))
    p = _SRHT_DEVICE_CACHE.get(key)
    if p is None:
        p = _srht_cpu(head_dim, sketch_dim, seed).to(device)
        _SRHT_DEVICE_CACHE[key] = p
    return p


def sketch_seed(seed: int, layer_idx: int) -> int:
    """Each layer gets its own sketch, derived from the config seed."""
    return (seed * 1_000_003 + layer_idx * 7919 + 17) % (2**31 - 1)


def block_causal_mask(block_valid: torch.Tensor, q_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """[B, m, nb] bool: key block j is allowed for query block i (j <= i, j has valid tokens).

    q_blocks: [m] indices of the query blocks (default: all nb blocks, giving [B, nb, nb]);
    decode passes the few blocks it updates.  A query block with no valid key at all (a fully
    padded block) keeps its diagonal so every row has at least one entry and softmax stays finite.
    """
    nb = block_valid.shape[-1]
    kidx = torch.arange(nb, device=block_valid.device)
    qidx = kidx if q_blocks is None else q_blocks
    allowed = (kidx[None, :] <= qidx[:, None])[None] & block_valid[:, None, :]
    empty = ~allowed.any(-1, keepdim=True)
    return allowed | (empty & (kidx[None, :] == qidx[:, None])[None])


@dataclass(frozen=True)
class LayerSketch:
    """The sketch of one layer: block means, sketches and the block transition matrix.

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
    default) the exact sketch [I 0] (`exact_sketch`), which every layer shares: the
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


def transition_matrix(scores: torch.Tensor, exponent: float) -> torch.Tensor:
    """W = row_softmax(exponent * A), fp32; -inf entries get probability 0."""
    return torch.softmax(scores.float() * exponent, dim=-1)


def transition_rows(
    q_sketch: torch.Tensor, k_sketch: torch.Tensor, allowed: torch.Tensor, scale: float, exponent: float
) -> torch.Tensor:
    """Rows of W = softmax(s * A) averaged over heads.

    q_sketch: [B, Hq', m, r]; k_sketch: [B, Hk', nk, r] (Hq' a multiple of Hk');
    allowed: [B, m, nk] bool.  Returns [B, m, nk] fp32.
    """
    hq, hk = q_sketch.shape[1], k_sketch.shape[1]
    if hk != hq:  # each query head against its KV head; no reshape of the [m, nk] scores, whose
        k_sketch = k_sketch.repeat_interleave(hq // hk, dim=1)  # split inductor cannot express
    a = torch.matmul(q_sketch, k_sketch.transpose(-1, -2)) * scale  # under a dynamic length
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
    """The sketch of one prefill layer (q [B, Hq, n, D], k [B, Hkv, n, D]); no host sync.

    p: the layer's SRHT matrix (sketch_matrix), when the caller holds it already.
    process_group: tensor parallelism, each rank holding an equal share of the heads: the
    head-mean block means (head_scoring="mean") or the head-mean transition ("per_head") are
    averaged over the group with one all-reduce of [B, nb, D] or [B, nb, nb] per layer, so
    every rank selects exactly what one process holding every head would.  prefill_scoring=
    "bound" with head_scoring="mean" also averages the head-mean keys themselves, [B, n, D] fp32
    (a block's extremes do not combine from the ranks' extremes)."""
    bsz, hq, n, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    if p is None:
        p = sketch_matrix(config, layer_idx, d, q.device)
    qb, counts = block_means(head_reduce(q, config.head_scoring), config.block_size, key_valid)  # [B, Hq', nb, D]
    kb, _ = block_means(head_reduce(k, config.head_scoring), config.block_size, key_valid)  # [B, Hk', nb, D]
    if counts.shape[0] != bsz:
        counts = counts.expand(bsz, -1)
    if process_group is not None and config.head_scoring == "mean":
        qb, kb = group_mean(qb, process_group), group_mean(kb, process_group)
    block_valid = counts > 0  # [B, nb]
    allowed = block_causal_mask(block_valid)
    ks = kb @ p
    if config.prefill_scoring == "bound":
        kr = head_reduce(k, config.head_scoring)
        if process_group is not None and config.head_scoring == "mean":
            kr = group_mean(kr, process_group)  # every rank's heads' mean key, per token
        a = bound_scores(qb, key_bounds(kr, config.block_size, key_valid, config.head_scoring)) * scale
        w = transition_matrix(a.masked_fill(~allowed[:, None], float("-inf")), config.sparsity_exponent).mean(1)
    else:
        w = transition_rows(qb @ p, ks, allowed, scale, config.sparsity_exponent)
    if process_group is not None and config.head_scoring == "per_head":
        w = group_mean(w, process_group)
    return LayerSketch(qb, kb, counts, ks, w, allowed, block_valid)
