"""Stage 2 of the selection: transition matrices, the cross-layer walk and top-k blocks.

`WalkState` is the only thing carried from one sparse layer to the next inside one forward
pass.  Its lifetime is one forward (prefill) pass: the transformers integration keeps it on
the per-forward mask context, the functional API hands it back to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SketchWalkConfig


@dataclass(frozen=True)
class WalkState:
    """Walk matrix R of the last sparse layer of this forward pass.

    transition: [B, nb, nb] fp32, row-stochastic and block-lower-triangular.
    """

    transition: torch.Tensor
    layer_idx: int
    block_size: int
    seq_len: int

    def check_compatible(self, batch: int, seq_len: int, block_size: int) -> None:
        if (self.transition.shape[0], self.seq_len, self.block_size) != (batch, seq_len, block_size):
            raise ValueError(
                f"state: WalkState from layer {self.layer_idx} was built for batch="
                f"{self.transition.shape[0]}, seq_len={self.seq_len}, block_size={self.block_size}; "
                f"this layer has batch={batch}, seq_len={seq_len}, block_size={block_size}. "
                "A WalkState lives for one forward pass: pass state=None to start a new one."
            )


@dataclass(frozen=True)
class BlockSelection:
    """Key blocks each query block attends to, shared by all heads.

    mask: [B, nq, nk] bool block table (True = attend).  block_size tokens per key block,
    q_block_size per query block (default block_size; a multiple of it when the kernel's query
    blocks pool several walk rows), seq_len real tokens (the last blocks may be partial).
    kept / causal: [B] fp32 counts of selected and of allowed causal (query block, key block)
    pairs, for density reports without a host sync.
    """

    mask: torch.Tensor
    block_size: int
    seq_len: int
    kept: torch.Tensor
    causal: torch.Tensor
    q_block_size: int | None = None

    def __post_init__(self) -> None:
        if self.q_block_size is None:
            object.__setattr__(self, "q_block_size", self.block_size)

    @property
    def num_blocks(self) -> int:
        """Key blocks (of block_size tokens)."""
        return self.mask.shape[-1]

    def block_rows(self) -> torch.Tensor:
        """[B, nk, nk] bool: the selection per query block of block_size tokens (each kernel query
        block's row repeated for its sub-blocks); the mask itself when the two sizes agree."""
        m = self.q_block_size // self.block_size
        return self.mask if m == 1 else self.mask.repeat_interleave(m, dim=1)[:, : self.num_blocks]

    def density(self) -> float:
        """Achieved fraction of the causal block triangle (host sync: for reports and tests)."""
        return float(self.kept.sum() / self.causal.sum())

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [B, nq] int32, indices [B, nq, nk] int32): selected block ids first, ascending."""
        return table_to_indices(self.mask)


def table_to_indices(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool block table [..., nk] -> (counts int32 [...], indices int32 [..., nk]); selected first."""
    counts = table.sum(-1, dtype=torch.int32)
    order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True)
    return counts, order.to(torch.int32)


def transition_matrix(scores: torch.Tensor, exponent: float) -> torch.Tensor:
    """W = row_softmax(exponent * A), fp32; -inf entries get probability 0."""
    return torch.softmax(scores.float() * exponent, dim=-1)


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def walk_combine(w: torch.Tensor, prev: torch.Tensor | None, transition: torch.Tensor, mode: str,
                 damping: float, steps: int = 1) -> torch.Tensor:
    """The walk rule on rows: w (one_hop, or no previous layer), normalise(prev @ transition)
    (walk), or (1 - beta) w + beta normalise(prev @ transition) (damped), applied `steps` times
    with prev replaced by the result (config.walk_steps).

    Prefill: w = W_l, prev = R_{l-1}, transition = W_l.  Decode: w = the token's row,
    prev = the previous layer's row, transition = this layer's W_l.  All [B, m, nb].  A row of
    the result depends only on the same rows of w and prev, so decode's single row follows
    prefill's rule exactly.
    """
    if prev is None or mode == "one_hop":
        return w
    r = prev
    for _ in range(steps):
        walked = _normalise_rows(torch.bmm(r, transition))
        r = walked if mode == "walk" else (1.0 - damping) * w + damping * walked
    return r


def walk_step(w: torch.Tensor, state: WalkState | None, config: SketchWalkConfig) -> torch.Tensor:
    """R_l from this layer's transition W_l and the previous sparse layer's R_{l-1}."""
    prev = None if state is None else state.transition
    return walk_combine(w, prev, w, config.walk, config.damping, config.walk_steps)


def fraction_count(count: torch.Tensor, fraction: float) -> torch.Tensor:
    """ceil(fraction * count) in count's dtype (the budget rule of `config.block_budget`, on tensors)."""
    return torch.ceil(count.to(torch.float64) * fraction - 1e-9).to(count.dtype)


def rank_blocks(
    walk: torch.Tensor,
    allowed: torch.Tensor,
    block_valid: torch.Tensor,
    q_blocks: torch.Tensor,
    *,
    sink_blocks: int,
    local_blocks: int,
    top_k: int | None,
    density: float | None,
    dense_rows: torch.Tensor | None = None,
    pinned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The budget rule shared by prefill and decode, for m query blocks.

    walk: [B, m, nb] scores; allowed: [B, m, nb]; block_valid: [B, nb]; q_blocks: [m] index of
    each query block.  Sink blocks are the first `sink_blocks` valid blocks of each row, local
    blocks the diagonal and `local_blocks - 1` before it; both are forced.  dense_rows: [m]
    bool, rows that keep every causal block.  pinned: [B, nb] bool, blocks forced like sink
    and local ones (sparse decode's pinned prompt blocks).  Returns (kept [B, m], order [B, m, nb] with the
    kept blocks first, ties towards the lower index, n_causal [B, m]).  No host sync.
    """
    nb = walk.shape[-1]
    idx = torch.arange(nb, device=walk.device)
    causal_valid = allowed & block_valid[:, None, :]
    # rank of each valid block among the valid blocks of its row (0 = first real block)
    valid_rank = torch.cumsum(block_valid.to(torch.int32), -1) - 1  # [B, nb]
    sink = valid_rank[:, None, :] < sink_blocks
    local = idx[None, :] > q_blocks[:, None] - local_blocks  # j > i - local  (j <= i via allowed)
    forced = causal_valid & (sink | local[None])
    if pinned is not None:
        forced = forced | (causal_valid & pinned[:, None, :])
    n_causal = causal_valid.sum(-1)  # [B, m]
    n_forced = forced.sum(-1)
    if top_k is not None:
        budget = torch.full_like(n_causal, top_k)
    else:
        budget = fraction_count(n_causal, density)
    kept = torch.minimum(n_causal, torch.maximum(n_forced, budget))
    if dense_rows is not None:
        kept = torch.where(dense_rows[None], n_causal, kept)
    # Rows without any valid key (fully padded query blocks) keep their diagonal only.
    kept = torch.where(n_causal == 0, torch.ones_like(kept), kept)
    score = walk.float().masked_fill(~allowed, float("-inf"))
    score = score.masked_fill(forced, float("inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return kept, order, n_causal


def pool_rows(x: torch.Tensor, m: int) -> torch.Tensor:
    """[B, nb, nk] -> [B, ceil(nb / m), nk]: each group of m rows pooled (rows past nb count as
    zero / False): the mean for scores, any() for bool tables."""
    if x.dtype == torch.bool:
        # through fp32: CPU inductor miscompiles a bool pad of a fused bool table (dynamic shapes)
        return pool_rows(x.float(), m) > 0
    nb = x.shape[1]
    nq = -(-nb // m)
    x = torch.nn.functional.pad(x, (0, 0, 0, nq * m - nb))
    return x.reshape(x.shape[0], nq, m, x.shape[-1]).mean(2)


def select_blocks(
    walk: torch.Tensor,
    allowed: torch.Tensor,
    block_valid: torch.Tensor,
    config: SketchWalkConfig,
    seq_len: int | torch.Tensor,
) -> BlockSelection:
    """Top-k key blocks per query block from the walk matrix, plus sink, local and tail blocks.

    walk: [B, nb, nb] scores (higher = keep); allowed: [B, nb, nb] bool causal/valid blocks;
    block_valid: [B, nb] bool blocks holding at least one real token.  Sink blocks are the
    first `sink_blocks` valid blocks of each row, so they count from its first real token.
    seq_len: real tokens (an int, or a 0-d tensor when the blocks cover a padded bucket whose
    extra blocks are invalid).  Ties break towards the lower block index.  No host synchronisation.

    config.query_block_size (m = q_block / block_size walk rows per kernel query block, m > 1):
    kernel query block I pools rows I*m .. I*m+m-1: the mean of their walk rows, the union of
    their allowed blocks; its causal extent is its last sub-row, its local blocks are those of
    its `local_blocks` last kernel query blocks (local_blocks * m key blocks, its own m
    diagonal ones first) and the dense tail counts kernel query blocks.  mask: [B, nq, nb] with
    nq = ceil(nb / m).
    """
    nb = walk.shape[-1]
    idx = torch.arange(nb, device=walk.device)
    # the real last block: seq_len may be a 0-d tensor when walk covers a padded bucket (graphs)
    last = -(-seq_len // config.block_size)
    if isinstance(seq_len, torch.Tensor):  # query blocks past the real ones select nothing
        allowed = allowed & (idx < last)[None, :, None]
    m = config.q_block // config.block_size
    q_idx = q_blocks = idx
    if m > 1:
        walk, allowed = pool_rows(walk, m), pool_rows(allowed, m)
        q_idx = torch.arange(walk.shape[1], device=walk.device)
        q_blocks = q_idx * m + (m - 1)
        last = -(-seq_len // config.q_block)
    tail = (q_idx >= last - config.dense_tail_blocks) if config.dense_tail_blocks else None
    kept, order, n_causal = rank_blocks(
        walk, allowed, block_valid, q_blocks, sink_blocks=config.sink_blocks,
        local_blocks=config.local_blocks * m, top_k=config.top_k_blocks, density=config.density, dense_rows=tail,
    )
    take = idx[None, None, :] < kept[..., None]
    mask = torch.zeros_like(allowed).scatter_(-1, order, take)
    mask = mask & allowed
    kept_total = (mask & block_valid[:, None, :]).sum((-1, -2)).float()
    causal_total = n_causal.sum(-1).float()
    return BlockSelection(mask=mask, block_size=config.block_size, seq_len=seq_len, kept=kept_total,
                          causal=causal_total, q_block_size=config.q_block)
