"""Stage 3: block tables -> FlexAttention BlockMask (always through from_kv_blocks).

Two block tables describe a mask: `partial` blocks run mask_mod on every element, `full`
blocks skip it (about 11-15% faster).  The mask_mod itself also encodes the selection, so
flex's eager path computes the same function as the compiled kernel (FLEX_AND_HF_FACTS.md).
Every tensor here is block-level ([B, nq, nk]) or token-level along one axis ([B, S]); none
is n x n.  The mask has one head: the selection is shared by all query heads.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask

from .walk import BlockSelection, table_to_indices

_HAS_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def make_mask_mod(
    *,
    block_size: int,
    block_table: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    q_offset: torch.Tensor | None = None,
    window: int | None = None,
):
    """mask_mod(b, h, q_idx, kv_idx) -> bool for causal (+window) (+padding) (+selection).

    block_table: [B, nq, nk] bool selection.  key_valid: [B, >= nk*block_size] bool, False
    at padding.  q_offset: 0-d int tensor, absolute position of query 0 (a tensor, not a
    Python int, so a new offset never recompiles).  A padding query attends to itself so its
    row stays finite.
    """
    bs = block_size

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx if q_offset is None else q_idx + q_offset
        keep = kv_idx <= q_abs
        if window is not None:
            keep = keep & (kv_idx > q_abs - window)
        if key_valid is not None:
            keep = (keep & key_valid[b, kv_idx]) | (kv_idx == q_abs)
        if block_table is not None:
            keep = keep & block_table[b, q_idx // bs, kv_idx // bs]
        return keep

    return mask_mod


def pad_key_valid(key_valid: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a [B, S] validity mask with False up to `length` tokens (flex reads whole blocks)."""
    extra = length - key_valid.shape[-1]
    return torch.nn.functional.pad(key_valid, (0, extra), value=False) if extra > 0 else key_valid


def block_mask_from_tables(
    partial: torch.Tensor,
    full: torch.Tensor,
    mask_mod,
    block_size: int,
    q_len: int,
    kv_len: int,
) -> BlockMask:
    """[B, nq, nk] bool partial/full tables -> BlockMask with one mask head."""
    p_cnt, p_idx = table_to_indices(partial)
    f_cnt, f_idx = table_to_indices(full)
    kwargs = {"compute_q_blocks": False} if _HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        p_cnt[:, None],
        p_idx[:, None],
        f_cnt[:, None],
        f_idx[:, None],
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
        **kwargs,
    )


def _block_bounds(length: int, block_size: int, device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    nb = (length + block_size - 1) // block_size
    lo = torch.arange(nb, device=device) * block_size
    hi = torch.clamp(lo + block_size, max=length) - 1
    return lo + offset, hi + offset


def _key_block_counts(key_valid: torch.Tensor | None, batch: int, kv_len: int, block_size: int, device) -> torch.Tensor:
    """[B, nk] number of valid keys per block (inside the sequence)."""
    nk = (kv_len + block_size - 1) // block_size
    if key_valid is None:
        key_valid = torch.ones(1, kv_len, dtype=torch.bool, device=device)
    kv = pad_key_valid(key_valid[:, :kv_len], nk * block_size)
    counts = kv.reshape(kv.shape[0], nk, block_size).sum(-1)
    return counts.expand(batch, nk)


def structural_tables(
    batch: int,
    q_len: int,
    kv_len: int,
    block_size: int,
    device,
    *,
    key_valid: torch.Tensor | None = None,
    q_offset: int = 0,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(maybe, full) [B, nq, nk] tables of the causal (+window) (+padding) mask.

    maybe: the block holds at least one allowed element (may over-approximate); full: every
    element of the block is allowed, so mask_mod can be skipped there.
    """
    q_lo, q_hi = _block_bounds(q_len, block_size, device, q_offset)
    k_lo, k_hi = _block_bounds(kv_len, block_size, device)
    maybe = k_lo[None, :] <= q_hi[:, None]
    full = k_hi[None, :] <= q_lo[:, None]
    if window is not None:
        maybe = maybe & (k_hi[None, :] > q_lo[:, None] - window)
        full = full & (k_lo[None, :] > q_hi[:, None] - window)
    counts = _key_block_counts(key_valid, batch, kv_len, block_size, device)
    sizes = (k_hi - k_lo + 1)[None, :]
    has_valid = counts > 0
    fully_valid = counts == sizes
    # A block whose keys are all padding is still needed where it holds a padding query's own
    # position (that query attends to itself only).
    holds_self = (k_lo[None, :] <= q_hi[:, None]) & (k_hi[None, :] >= q_lo[:, None])
    maybe = maybe[None] & (has_valid[:, None, :] | holds_self[None])
    full = full[None] & fully_valid[:, None, :]
    return maybe, full


def selection_block_mask(
    selection: BlockSelection,
    *,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
) -> BlockMask:
    """BlockMask for a prefill selection (queries and keys both cover tokens 0..n-1)."""
    table = selection.mask
    bsz, nq, nk = table.shape
    n, bs = selection.seq_len, selection.block_size
    maybe, full = structural_tables(bsz, n, n, bs, table.device, key_valid=key_valid, window=window)
    sel = table & maybe
    full = sel & full
    kv = None if key_valid is None else pad_key_valid(key_valid, nk * bs)
    mask_mod = make_mask_mod(block_size=bs, block_table=table, key_valid=kv, window=window)
    return block_mask_from_tables(sel & ~full, full, mask_mod, bs, n, n)


def dense_block_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    block_size: int,
    device,
    *,
    key_valid: torch.Tensor | None = None,
    q_offset: int = 0,
    window: int | None = None,
) -> BlockMask:
    """BlockMask of plain causal attention (+window, +padding), queries at q_offset..q_offset+q_len-1."""
    maybe, full = structural_tables(
        batch, q_len, kv_len, block_size, device, key_valid=key_valid, q_offset=q_offset, window=window
    )
    nk = maybe.shape[-1]
    kv = None if key_valid is None else pad_key_valid(key_valid[:, :kv_len], nk * block_size)
    off = None if q_offset == 0 else torch.tensor(q_offset, device=device)
    mask_mod = make_mask_mod(block_size=block_size, key_valid=kv, q_offset=off, window=window)
    return block_mask_from_tables(maybe & ~full, full, mask_mod, block_size, q_len, kv_len)
