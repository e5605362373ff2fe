"""Stage 3: block tables -> FlexAttention BlockMask (always through from_kv_blocks).

Two block tables describe a mask: `partial` blocks run mask_mod on every element, `full`
blocks skip it (about 11-15% faster).  The mask_mod itself also encodes the selection, so
flex's eager path computes the same function as the compiled kernel (FLEX_AND_HF_FACTS.md).
Every tensor here is block-level ([B, nq, nk]) or per row ([B]); none is n x n.  The mask
has one head: the selection is shared by all query heads.

Length buckets: masks are built for lengths rounded up to `bucket_length(n)` (at most four
buckets per octave, a multiple of 256).  Flex then compiles once per bucket instead of once
per prompt length; the extra query blocks get no key block at all and the extra keys sit
outside every row's [start, end) interval, so the padding costs a copy, not attention.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask

from .walk import BlockSelection, table_to_indices

_HAS_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
BUCKET_GRANULE = 256


def packed(t: torch.Tensor) -> torch.Tensor:
    """A copy with standard strides, size-1 dims included (compiled kernels guard on strides)."""
    return t.clone(memory_format=torch.contiguous_format)


def bucket_length(n: int) -> int:
    """Length a mask of n tokens is built for: n rounded up to <= 4 buckets per octave."""
    step = max(BUCKET_GRANULE, (1 << max(0, n.bit_length() - 1)) // 4)
    return -(-n // step) * step


def key_bounds(key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] contiguous validity -> (start [B], end [B]) int32, no host sync.

    A row without any valid token gets start = end = S.
    """
    s = key_valid.shape[-1]
    pos = torch.arange(s, device=key_valid.device)  # int64 throughout: inductor rejects mixed int widths here
    # min / max of the valid positions (not argmax of an int8 cast: compiled on CUDA, inductor
    # returned that argmax in int8, so a start past 127 wrapped around, found by the GPU check)
    start = torch.where(key_valid, pos, s).amin(-1)
    end = torch.where(key_valid, pos + 1, 0).amax(-1)
    end = torch.where(key_valid.any(-1), end, s)
    return start.to(torch.int32), end.to(torch.int32)


def contiguous_rows(key_valid: torch.Tensor) -> torch.Tensor:
    """[B] bool: the rows of a [B, S] padding mask whose real tokens are contiguous (left and/or
    right padding only, no padding between real tokens).  No host sync."""
    start, end = key_bounds(key_valid)
    return key_valid.sum(-1) == (end - start).clamp_min(0)


def has_holes(key_valid: torch.Tensor) -> bool:
    """Whether some row of a [B, S] padding mask has padding between real tokens (a mask with
    holes).  One host sync."""
    return not bool(contiguous_rows(key_valid).all())


def padded_validity(key_valid: torch.Tensor, length: int) -> torch.Tensor:
    """[B, S] bool validity cut or padded with False to `length` keys (a bucket's)."""
    s = key_valid.shape[-1]
    if s >= length:
        return key_valid[:, :length]
    return torch.nn.functional.pad(key_valid, (0, length - s), value=False)


def block_valid_counts(key_valid: torch.Tensor, block_size: int, num_blocks: int) -> torch.Tensor:
    """[B, num_blocks] int32: the real keys of each key block (keys past S count as padding)."""
    v = padded_validity(key_valid, num_blocks * block_size)
    return v.reshape(v.shape[0], num_blocks, block_size).sum(-1, dtype=torch.int32)


def _bounds(batch: int, kv_len: int | torch.Tensor, key_valid: torch.Tensor | None,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(kv_len, torch.Tensor):  # a padded bucket: key_valid is False past the real length
        if key_valid is None:
            raise ValueError("a tensor kv_len needs key_valid covering the padded length")
        return key_bounds(key_valid)
    if key_valid is None:
        return (torch.zeros(batch, dtype=torch.int32, device=device),
                torch.full((batch,), kv_len, dtype=torch.int32, device=device))
    return key_bounds(key_valid[:, :kv_len])


def make_mask_mod(
    *,
    block_size: int,
    q_block: int | None = None,
    start: torch.Tensor,
    end: torch.Tensor,
    block_table: torch.Tensor | None = None,
    q_offset: torch.Tensor | None = None,
    window: int | None = None,
    valid: torch.Tensor | None = None,
):
    """mask_mod(b, h, q_idx, kv_idx) -> bool for causal (+window) (+selection) within [start, end).

    start, end: [B] int32, each row's real keys (padding and bucket padding lie outside).
    block_table: [B, nq, nk] bool selection, query blocks of q_block tokens (default block_size),
    key blocks of block_size.  q_offset: 0-d int tensor, absolute position of query 0 (a tensor,
    not a Python int, so a new offset never recompiles).  valid: [B, >= the mask's key length]
    bool, each key's validity (`padded_validity`): padding between real tokens (a mask with holes)
    lies inside [start, end) and only this term keeps it out.  A padding query attends to itself
    so its row stays finite.
    """
    bs = block_size
    qb = block_size if q_block is None else q_block

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx if q_offset is None else q_idx + q_offset
        keep = (kv_idx <= q_abs) & (kv_idx >= start[b]) & (kv_idx < end[b])
        if valid is not None:
            keep = keep & valid[b, kv_idx]
        if window is not None:
            keep = keep & (kv_idx > q_abs - window)
        keep = keep | (kv_idx == q_abs)
        if block_table is not None:
            keep = keep & block_table[b, q_idx // qb, kv_idx // bs]
        return keep

    return mask_mod


def kernel_mask_mod(*, window: int | None = None):
    """The mask_mod the compiled kernel needs for a selection without padding: plain causal
    (+window).  The kernel visits only the BlockMask's (selected) blocks and runs mask_mod
    only on their partial ones, the key blocks a query block overlaps (the diagonal block, or
    with query_block_size its m diagonal key blocks), which every row keeps (local blocks);
    there the selection and the [0, n) bounds of `make_mask_mod` are always true for the rows
    that are kept, and leaving out their per-element loads makes the kernel 5-14% faster on an H100
    (docs/benchmarks.md).  Only for compiled flex: uncompiled flex evaluates mask_mod on every
    element and needs `make_mask_mod`'s selection term (attention.flex swaps this one in)."""

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if window is not None:
            keep = keep & (kv_idx > q_idx - window)
        return keep

    return mask_mod


def block_mask_from_indices(p_cnt, p_idx, f_cnt, f_idx, mask_mod, block_size: int | tuple[int, int], q_len: int,
                            kv_len: int) -> BlockMask:
    """Counts [B, nq] / indices [B, nq, nk] of partial and full blocks -> BlockMask, one mask head.

    block_size: tokens per block, or (query block, key block) tokens."""
    kwargs = {"compute_q_blocks": False} if _HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        p_cnt[:, None], p_idx[:, None], f_cnt[:, None], f_idx[:, None],
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(q_len, kv_len), **kwargs,
    )


def block_mask_from_tables(partial, full, mask_mod, block_size: int | tuple[int, int], q_len: int,
                           kv_len: int) -> BlockMask:
    """[B, nq, nk] bool partial/full tables -> BlockMask with one mask head."""
    return block_mask_from_indices(*table_to_indices(partial), *table_to_indices(full), mask_mod, block_size,
                                   q_len, kv_len)


def structural_tables(
    q_len: int | torch.Tensor,
    kv_len: int | torch.Tensor,
    block_size: int,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    q_offset: int = 0,
    window: int | None = None,
    q_pad: int | None = None,
    kv_pad: int | None = None,
    q_block: int | None = None,
    valid_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(maybe, full) [B, nq, nk] tables of causal (+window) attention inside [start, end).

    maybe: the block may hold an allowed element (over-approximates); full: every element of
    the block is allowed, so mask_mod is skipped there.  q_pad / kv_pad: bucket lengths; their
    extra blocks are empty.  q_len / kv_len may be 0-d tensors (then q_pad / kv_pad are needed).
    Query blocks of q_block tokens (default block_size), key blocks of block_size.
    valid_counts: [B, nk] real keys per key block (`block_valid_counts`), for padding with holes,
    which [start, end) alone over-counts: a block with a hole is never full.
    """
    dev = start.device
    qb = block_size if q_block is None else q_block
    nq = -(-(q_pad or q_len) // qb)
    nk = -(-(kv_pad or kv_len) // block_size)
    qi = torch.arange(nq, device=dev) * qb
    kj = torch.arange(nk, device=dev) * block_size
    q_lo = (qi + q_offset)[:, None]
    q_hi = (torch.clamp(qi + qb, max=q_len) - 1 + q_offset)[:, None]
    k_lo = kj[None, :]
    k_hi = (torch.clamp(kj + block_size, max=kv_len) - 1)[None, :]
    real = (qi < q_len)[:, None] & (kj < kv_len)[None, :]
    maybe = real & (k_lo <= q_hi)
    full = real & (k_hi <= q_lo) & (k_hi - k_lo + 1 == block_size)
    if window is not None:
        maybe = maybe & (k_hi > q_lo - window)
        full = full & (k_lo > q_hi - window)
    # keys of block j inside row b's [start, end)
    s, e = start[:, None, None], end[:, None, None]
    n_valid = (torch.minimum(k_hi[None] + 1, e) - torch.maximum(k_lo[None], s)).clamp_min(0)
    if valid_counts is not None:
        n_valid = torch.minimum(n_valid, valid_counts[:, None, :])
    holds_self = (k_lo <= q_hi) & (k_hi >= q_lo)  # a padding query's own position
    maybe = maybe[None] & ((n_valid > 0) | holds_self[None])
    full = full[None] & (n_valid == block_size)
    return maybe, full


def _pad_table(table: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    return torch.nn.functional.pad(table, (0, nk - table.shape[-1], 0, nq - table.shape[-2]), value=False)


def selection_block_mask(
    selection: BlockSelection,
    *,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
    bucket: bool = True,
) -> BlockMask:
    """BlockMask for a prefill selection (queries and keys both cover tokens 0..n-1).

    With bucket=True the mask covers bucket_length(n) tokens: pad q, k, v to
    `block_mask.seq_lengths` (attention.flex does this) and drop the extra rows.  key_valid may
    have holes: its mask_mod checks each key's validity.
    """
    n, bs, qb = selection.seq_len, selection.block_size, selection.q_block_size
    n_pad = bucket_length(n) if bucket else n
    partial, full, table, start, end = selection_tables(selection, n_pad, key_valid=key_valid, window=window)
    valid = None if key_valid is None else padded_validity(key_valid, n_pad)
    mask_mod = make_mask_mod(block_size=bs, q_block=qb, start=start, end=end, block_table=table, window=window,
                             valid=valid)
    return block_mask_from_tables(partial, full, mask_mod, (qb, bs), n_pad, n_pad)


def selection_tables(selection: BlockSelection, n_pad: int, *, key_valid: torch.Tensor | None = None,
                     window: int | None = None):
    """A prefill selection's (partial, full) block tables over n_pad tokens (query blocks of
    selection.q_block_size tokens, key blocks of block_size), the selection table padded to them,
    and each row's real-key bounds (start, end): tensors only, no host sync.  With key_valid, a
    key block is full only if all its keys are real (padding with holes included)."""
    table = selection.mask
    n, bs = selection.seq_len, selection.block_size
    start, end = _bounds(table.shape[0], n, key_valid, table.device)
    counts = None
    if key_valid is not None and not isinstance(n, torch.Tensor):
        counts = block_valid_counts(key_valid[:, :n], bs, n_pad // bs)
    maybe, full = structural_tables(n, n, bs, start, end, window=window, q_pad=n_pad, kv_pad=n_pad,
                                    q_block=selection.q_block_size, valid_counts=counts)
    table = _pad_table(table, maybe.shape[1], maybe.shape[2])
    chosen = table & maybe
    full = chosen & full
    return chosen & ~full, full, table, start, end


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
    bucket: bool = True,
) -> BlockMask:
    """BlockMask of causal attention (+window, +padding, holes too), queries at
    q_offset..q_offset+q_len-1."""
    start, end = _bounds(batch, kv_len, key_valid, device)
    q_pad = bucket_length(q_len) if bucket else q_len
    kv_pad = bucket_length(kv_len) if bucket else kv_len
    counts = valid = None
    if key_valid is not None:
        counts = block_valid_counts(key_valid[:, :kv_len], block_size, -(-kv_pad // block_size))
        valid = padded_validity(key_valid[:, :kv_len], kv_pad)
    maybe, full = structural_tables(
        q_len, kv_len, block_size, start, end, q_offset=q_offset, window=window, q_pad=q_pad, kv_pad=kv_pad,
        valid_counts=counts,
    )
    off = None if q_offset == 0 else torch.full((), q_offset, dtype=torch.int64, device=device)
    mask_mod = make_mask_mod(block_size=block_size, start=start, end=end, q_offset=off, window=window, valid=valid)
    return block_mask_from_tables(maybe & ~full, full, mask_mod, block_size, q_pad, kv_pad)
