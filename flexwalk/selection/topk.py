"""Selection, stage 3: the top-k.  Walk scores -> the key blocks each query block keeps: the
budget rule (density or top_k_blocks, at least the forced sink and local blocks, every causal
block in the dense tail), the top blocks by score (ties to the lower index) and the
`BlockSelection` they make.  Prefill (torch), the Triton selection's budget table, sparse decode
and `expected_density` all use this one rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import SketchWalkConfig


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


def fraction_count(count: torch.Tensor, fraction: float) -> torch.Tensor:
    """ceil(fraction * count) in count's dtype, computed in float64 (1e-9 below the ceiling, so
    that a product that is a whole number up to rounding stays that number)."""
    return torch.ceil(count.to(torch.float64) * fraction - 1e-9).to(count.dtype)


def block_budget(n_causal: torch.Tensor, *, top_k: int | None, density: float | None) -> torch.Tensor:
    """The budget of a row with n_causal causal blocks, forced blocks not yet counted: top_k
    blocks, or ceil(density * n_causal).  In n_causal's dtype."""
    if top_k is not None:
        return torch.full_like(n_causal, top_k)
    return fraction_count(n_causal, density)


def kept_blocks(n_causal: torch.Tensor, n_forced: torch.Tensor, *, top_k: int | None,
                density: float | None) -> torch.Tensor:
    """The blocks a row keeps: its budget, at least its forced blocks, at most its causal ones."""
    return torch.minimum(n_causal, torch.maximum(n_forced, block_budget(n_causal, top_k=top_k, density=density)))


def descending_order(score: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row of `score` from the highest, ties towards the lower index."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices


def first_in_order(order: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[..., n] bool: True at the first count[...] entries of each row's order (`descending_order`)."""
    take = torch.arange(order.shape[-1], device=order.device) < count[..., None]
    return torch.zeros_like(take).scatter_(-1, order, take)


def top_fraction(score: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """[B, nb] bool: the ceil(fraction * valid blocks) valid blocks of each row with the largest
    score (ties towards the lower index).  No host sync."""
    count = fraction_count(valid.sum(-1), fraction)  # [B]
    order = descending_order(score.float().masked_fill(~valid, float("-inf")))
    return first_in_order(order, count) & valid


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
    kept = kept_blocks(n_causal, forced.sum(-1), top_k=top_k, density=density)
    if dense_rows is not None:
        kept = torch.where(dense_rows if dense_rows.dim() == 2 else dense_rows[None], n_causal, kept)
    # Rows without any valid key (fully padded query blocks) keep their diagonal only.
    kept = torch.where(n_causal == 0, torch.ones_like(kept), kept)
    score = walk.float().masked_fill(~allowed, float("-inf"))
    score = score.masked_fill(forced, float("inf"))
    return kept, descending_order(score), n_causal


def short_rows(key_valid: torch.Tensor | None, config: SketchWalkConfig,
               seq_len: int | torch.Tensor) -> torch.Tensor | None:
    """[B] bool: in a padded batch of seq_len >= dense_below tokens (the width at which the
    layer runs sparse), the rows with fewer real tokens (key_valid's True) than dense_below (on
    key_valid's device): they keep every causal block, as they would run alone.  None without
    key_valid or with dense_below 0.  A batch narrower than dense_below runs dense anyway (the
    callers decide that); selecting on it directly keeps every row sparse.  No host sync."""
    if key_valid is None:
        return None
    threshold = config.min_sparse_length(key_valid.device)
    if threshold <= 0:
        return None
    return (key_valid.sum(-1) < threshold) & (seq_len >= threshold)


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
    short_rows: torch.Tensor | None = None,
) -> BlockSelection:
    """Top-k key blocks per query block from the walk matrix, plus sink, local and tail blocks.

    walk: [B, nb, nb] scores (higher = keep); allowed: [B, nb, nb] bool causal/valid blocks;
    block_valid: [B, nb] bool blocks holding at least one real token.  Sink blocks are the
    first `sink_blocks` valid blocks of each row, so they count from its first real token.
    seq_len: real tokens (an int, or a 0-d tensor when the blocks cover a padded bucket whose
    extra blocks are invalid).  short_rows: [B] bool, batch rows with fewer real tokens than
    dense_below (`short_rows`): every query block of theirs keeps every causal block, as the row
    would alone.  Ties break towards the lower block index.  No host synchronisation.

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
    if short_rows is not None:
        tail = short_rows[:, None] if tail is None else (tail[None] | short_rows[:, None])
        tail = tail.expand(walk.shape[0], walk.shape[1])
    kept, order, n_causal = rank_blocks(
        walk, allowed, block_valid, q_blocks, sink_blocks=config.sink_blocks,
        local_blocks=config.local_blocks * m, top_k=config.top_k_blocks, density=config.density, dense_rows=tail,
    )
    mask = first_in_order(order, kept) & allowed
    kept_total = (mask & block_valid[:, None, :]).sum((-1, -2)).float()
    causal_total = n_causal.sum(-1).float()
    return BlockSelection(mask=mask, block_size=config.block_size, seq_len=seq_len, kept=kept_total,
                          causal=causal_total, q_block_size=config.q_block)


def expected_density(config: SketchWalkConfig, seq_len: int, num_layers: int | None = None,
                     device: Any = "cpu") -> float:
    """Fraction of the causal block triangle computed at `seq_len` tokens (no padding).

    With ``num_layers`` the dense layers and the dense-below rule are included, giving the
    model-wide fraction; without it, the fraction of one sparse layer.  Counts blocks, as
    the kernel does (a partly filled last block counts as one): with query_block_size, the
    (query_block_size x block_size) tiles of the kernel's query blocks.  device: where the model runs
    (it sets dense_below="auto").  The selection's own budget rule (`kept_blocks`) decides each row.
    """
    _check_int_arg("seq_len", seq_len, 1)
    nb = math.ceil(seq_len / config.block_size)
    m = config.q_block // config.block_size  # walk rows pooled per kernel query block
    nq = -(-nb // m)
    causal, forced, tail = [], [], []
    for i in range(nq):
        n_causal = min(i * m + m, nb)  # key blocks up to the block's last sub-row
        sink = set(range(min(config.sink_blocks, n_causal)))
        local = set(range(max(0, (i - config.local_blocks + 1) * m), n_causal))
        causal.append(n_causal)
        forced.append(len(sink | local))
        tail.append(i >= nq - config.dense_tail_blocks)
    n_causal = torch.tensor(causal)
    kept = kept_blocks(n_causal, torch.tensor(forced), top_k=config.top_k_blocks, density=config.density)
    kept = torch.where(torch.tensor(tail), n_causal, kept)
    sparse = int(kept.sum()) / int(n_causal.sum())
    if num_layers is None:
        return sparse
    _check_int_arg("num_layers", num_layers, 1)
    if seq_len < config.min_sparse_length(device):
        return 1.0
    n_dense = min(config.dense_layer_count, num_layers)
    return (n_dense + (num_layers - n_dense) * sparse) / num_layers


def _check_int_arg(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r} is invalid: must be an int >= {lo}")
