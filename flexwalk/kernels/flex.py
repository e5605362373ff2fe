"""FlexAttention: block tables -> BlockMask (always through from_kv_blocks), and the compiled
flex_attention call every flex path goes through (`flex`).

Two block tables describe a mask: `partial` blocks run mask_mod on every element, `full`
blocks skip it (about 11-15% faster).  The mask_mod itself also encodes the selection, so
flex's eager path (which evaluates mask_mod on every element) computes the same function as
the compiled kernel.
Every tensor here is block-level ([B, nq, nk]) or per row ([B]); none is n x n.  The mask
has one head: the selection is shared by all query heads.

Length buckets: masks are built for lengths rounded up to `bucket_length(n)` (at most four
buckets per octave, a multiple of 256).  Flex then compiles once per bucket instead of once
per prompt length; the extra query blocks get no key block at all and the extra keys sit
outside every row's [start, end) interval, so the padding costs a copy, not attention.
All flex calls go through compiled functions with static shapes.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..compiled import with_own_code
from ..config import SketchWalkConfig
from ..selection.topk import BlockSelection, table_to_indices
from .triton_prefill import SMEM_MARGIN, shared_memory
from .triton_runtime import device_smem

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


def row_bounds(batch: int, kv_len: int | torch.Tensor, key_valid: torch.Tensor | None,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real keys [start, end) as [B] int32: [0, kv_len) without key_valid, else
    `key_bounds` of its first kv_len keys (kv_len a 0-d tensor: a padded bucket, all of them)."""
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
    element and needs `make_mask_mod`'s selection term (`flex` swaps this one in)."""

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


def pad_table(table: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """A [B, nq', nk'] bool block table padded with False to [B, nq, nk]."""
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
    `block_mask.seq_lengths` (`flex` does this) and drop the extra rows.  key_valid may
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
    start, end = row_bounds(table.shape[0], n, key_valid, table.device)
    counts = None
    if key_valid is not None and not isinstance(n, torch.Tensor):
        counts = block_valid_counts(key_valid[:, :n], bs, n_pad // bs)
    maybe, full = structural_tables(n, n, bs, start, end, window=window, q_pad=n_pad, kv_pad=n_pad,
                                    q_block=selection.q_block_size, valid_counts=counts)
    table = pad_table(table, maybe.shape[1], maybe.shape[2])
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
    start, end = row_bounds(batch, kv_len, key_valid, device)
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


def tables_block_mask(tables: tuple, config: SketchWalkConfig, n_pad: int) -> BlockMask:
    """The BlockMask of `fused_selection`'s tables over n_pad tokens."""
    p_cnt, p_idx, f_cnt, f_idx, table, start, end = tables
    bs, qb = config.block_size, config.q_block
    # fresh standard-layout copies: the compiled flex kernel specialises on these tensors
    start, end, table = (packed(t) for t in (start, end, table))
    mask_mod = make_mask_mod(block_size=bs, q_block=qb, start=start, end=end, block_table=table)
    return block_mask_from_indices(p_cnt, p_idx, f_cnt, f_idx, mask_mod, (qb, bs), n_pad, n_pad)


def _decode_mask_mod(start: torch.Tensor, end: torch.Tensor, kept: torch.Tensor, block_size: int):
    """Keys in [start[b], end) of the selected blocks (kept [B, C] bool): left padding and
    unwritten cache slots are out.  The selection is in the mask_mod too, not only in the
    block tables: flex_attention run without compile (which dynamo falls back to once its
    recompile limit is reached) reads only the mask_mod, and would otherwise attend densely."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= start[b]) & (kv_idx < end) & kept[b, kv_idx // block_size]

    return mask_mod


def decode_block_mask(kv_num: torch.Tensor, kv_idx: torch.Tensor, start, end, *, rows: int, kv_tokens: int,
                      block_size: int, zeros: tuple[torch.Tensor, torch.Tensor] | None = None) -> BlockMask:
    """One-row BlockMask: `rows` query rows (the query heads of one KV head) share one selection.

    zeros: (full_kv_num_blocks, full_kv_indices) all-zero tensors to reuse (CPU flex needs them).
    """
    bsz, c = kv_idx.shape
    num = kv_num.reshape(bsz, 1, 1)
    ind = kv_idx.reshape(bsz, 1, 1, c)
    # [B, C] bool of the selected blocks (entries of kv_idx past kv_num are not selected)
    live = (torch.arange(c, device=kv_idx.device) < kv_num.reshape(bsz, 1)).to(torch.int32)
    kept = torch.zeros(bsz, c, dtype=torch.int32, device=kv_idx.device).scatter_add_(1, kv_idx.long(), live) > 0
    if zeros is None:
        zeros = (torch.zeros_like(num), torch.zeros_like(ind))
    # Forward-only: skip the q-major transpose (a scatter over all blocks, the costliest part of
    # building the mask on the host) where this torch can.
    extra = {"compute_q_blocks": False} if _HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        num, ind, zeros[0], zeros[1],  # no full blocks (every block checks [start, end))
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=_decode_mask_mod(start, end, kept, block_size),
        seq_lengths=(rows, kv_tokens),
        **extra,
    )


# ----------------------------------------------------------------------------- the compiled call

# Static shapes, one compile per length bucket (`bucket_length`): automatic dynamic
# shapes miscompile torch 2.13's CPU flex kernel (undeclared cur_kvSplitSize in the C++).
compiled_flex = torch.compile(flex_attention, dynamic=False)


# Each distinct (bucket, block size, mask variant, softcap) is one compiled kernel; a model
# sees more than dynamo's default of 8 over its lifetime, after which flex would silently drop
# to its eager path (correct, since our mask_mod encodes the selection, but dense-cost).
_RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < _RECOMPILE_LIMIT:
        setattr(cfg, name, _RECOMPILE_LIMIT)


_raise_recompile_limit()


@functools.lru_cache(maxsize=64)
def softcap_score_mod(softcap: float):
    """score_mod for logit soft-capping (Gemma 2): softcap * tanh(score / softcap)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def flex_kernel_options(block_size: int, device: torch.device, *, dtype: torch.dtype = torch.bfloat16,
                        head_dim: int = 128, rows_safe: bool = False, q_block: int | None = None,
                        smem: int | None = None) -> dict | None:
    """Triton kernel options of a prefill flex call (CUDA only; None elsewhere).  smem: the
    device's shared memory per block (None: asked of the device).

    The kernel's tiles (BLOCK_M query rows x BLOCK_N keys) must divide the mask's blocks
    (q_block x block_size; q_block defaults to block_size).  Triton's default tiles are 128 x 64
    or 128 x 128 (an H100 at head dim 64), at most 128 x 128, so blocks of 128 tokens and more
    keep them; smaller key blocks get BLOCK_N = block_size and BLOCK_M = the query block, at most
    128 (a 256-row query block runs as two 128-row tiles, each visiting the block's key list).
    Those tiles keep flex's 3 pipeline stages where their shared memory fits the device, else
    fewer, else smaller tiles (`flex_tiles`: float32 at head dim 256 with 64-token blocks needs
    344064 bytes at 3 stages, more than a Hopper GPU's 232448).
    rows_safe: every row's first visited tile holds a key it may attend (see `flex`), so the
    kernel may skip its fully-masked-row guards (ROWS_GUARANTEED_SAFE: 1-3% on an H100,
    docs/benchmarks.md)."""
    if device.type != "cuda":
        return None
    opts = {}
    if block_size < 128:
        bm, bn = min(block_size if q_block is None else q_block, 128), block_size
        smem = device_smem(device) if smem is None else smem
        opts.update(zip(("BLOCK_M", "BLOCK_N", "num_stages"), flex_tiles(dtype, head_dim, bm, bn, smem)))
        if opts["num_stages"] == FLEX_STAGES:
            del opts["num_stages"]  # flex's own choice
    if rows_safe:
        opts["ROWS_GUARANTEED_SAFE"] = True
    return opts or None


FLEX_STAGES = 3  # the pipeline depth of flex's forward kernel on Hopper


@functools.cache
def flex_tiles(dtype: torch.dtype, head_dim: int, block_m: int, block_n: int, smem: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_stages) for a flex launch of block_m x block_n tiles whose shared
    memory fits `smem` bytes: fewer stages first, then halved tiles (which still divide the
    mask's blocks).  flex's forward kernel keeps the same tiles as flexwalk's Triton kernel (a
    Q tile, pipelined K and V tiles, P in float32), so `triton_prefill.shared_memory` gives its
    need: float32 at head dim 256 with 64 x 64 tiles and 3 stages is 344064 bytes by it, 344320
    as an H100 compiled it."""
    budget = smem - SMEM_MARGIN
    bm, bn = block_m, block_n
    while True:
        for stages in range(FLEX_STAGES, 0, -1):
            if shared_memory(dtype, head_dim, bm, bn, stages) <= budget:
                return bm, bn, stages
        if bm == bn == 16:
            return bm, bn, 1
        if bm >= bn:
            bm //= 2
        else:
            bn //= 2


def flex(q, k, v, block_mask, *, scale=None, softcap=None, block_size=128, decode=False,
         kernel_mask_mod=None, q_block=None, score_mod=None) -> torch.Tensor:
    """Compiled flex_attention with GQA and optional soft-capping; [B, Hq, L, D] out.

    q, k, v are zero-padded to the mask's (bucket) lengths and the output cut back.
    block_size / q_block: the mask's key / query block (q_block None: block_size), for the tiles.
    kernel_mask_mod: a cheaper mask_mod that agrees with block_mask's own on every partial
    block of its tables, for a selection without padding (`kernel_mask_mod`).  It is
    used only where flex surely compiles to its fused kernel (`kernel_mask_ok`), through a
    compiled function of its own per shape, so dynamo's recompile limit (past which flex would
    run its eager path, which evaluates mask_mod everywhere) is never reached; and with it the
    kernel also skips its guards for fully masked rows, since every row's first visited tile
    holds a key it may attend: flex visits a query block's partial blocks first, in ascending
    order (table_to_indices), and without padding the partial blocks of query block I are the
    key blocks it overlaps, the first of them (key block I * q_block / block_size) forced by
    the selection (local blocks cover the query block's own keys) and starting at key
    I * q_block, which every row of block I attends causally; BLOCK_N <= block_size, so the
    first tile starts there too.  (With q_block 128 and block_size 64: query block I visits
    key block 2I first, keys 128I..128I+63; with square blocks it is the diagonal block.)  Rows
    of the bucket padding may then come out NaN; they are cut off here.  score_mod: used
    instead of the soft-capping one (it must then apply softcap itself).
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError(
            "sketchwalk_flex: backward (training) through flex attention on CPU is not supported by torch; "
            "run inference under torch.no_grad() or torch.inference_mode()"
        )
    L, S = q.shape[2], k.shape[2]
    Lp, Sp = block_mask.seq_lengths
    if Lp != L:
        q = F.pad(q, (0, 0, 0, Lp - L))
    if Sp != S:
        k, v = F.pad(k, (0, 0, 0, Sp - S)), F.pad(v, (0, 0, 0, Sp - S))
    rows_safe = False
    if kernel_mask_mod is not None and kernel_mask_ok():
        block_mask = copy.copy(block_mask)
        block_mask.mask_mod = kernel_mask_mod
        rows_safe = True
    if score_mod is None and softcap is not None:
        score_mod = softcap_score_mod(float(softcap))
    options = None if decode else flex_kernel_options(
        block_size, q.device, dtype=q.dtype, head_dim=q.shape[-1], rows_safe=rows_safe, q_block=q_block)
    fn = flex_function(q, k, v, block_mask, scale, score_mod, options) if kernel_mask_ok() else compiled_flex
    out = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
             kernel_options=options)
    return out[:, :, :L] if Lp != L else out


def kernel_mask_ok() -> bool:
    """Whether a flex call from here surely runs inductor's fused kernel: not inside another
    dynamo trace (whose backend may be eager), dynamo not disabled, no forced-eager stance."""
    if torch.compiler.is_compiling() or torch._dynamo.config.disable:
        return False
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    return stance == "default"


_FLEX_FUNCTIONS: dict[tuple, object] = {}


def flex_functions() -> dict[tuple, object]:
    """A copy of the table of compiled per-signature flex functions: {signature: function}.  Its
    size is the number of flex kernels compiled in this process."""
    return dict(_FLEX_FUNCTIONS)


def clear_flex_functions() -> None:
    """Forget the compiled per-signature flex functions: later calls compile new ones."""
    _FLEX_FUNCTIONS.clear()


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _signature(value, depth: int = 0):
    """What dynamo guards on in a mask_mod / score_mod: its code, and in its closure the
    constants' values, the tensors' dtype and shape, and nested functions the same way."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.device)
    if callable(value) and hasattr(value, "__code__") and depth < 4:
        cells = tuple(_signature(_cell(c), depth + 1) for c in (value.__closure__ or ()))
        return (value.__code__, cells)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_signature(x, depth + 1) for x in value)
    return ("object", type(value))


def flex_function(q, k, v, block_mask, scale, score_mod, options):
    """flex_attention compiled for one input signature (what its guards check: shapes, strides,
    dtype, the mask_mod and score_mod functions, constants, grad mode), with a code object of
    its own.  A process sees many signatures (length buckets, batch sizes, block sizes, masks);
    one shared compiled function would recompile for each and, past dynamo's recompile limit,
    run flex's eager path (dense cost) instead.  Each function here compiles once."""
    key = (q.device, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(), k.stride(), v.stride(),
           k is v, block_mask.BLOCK_SIZE, tuple(block_mask.kv_indices.shape), block_mask.full_kv_indices is None,
           _signature(block_mask.mask_mod), _signature(score_mod), scale, tuple(sorted((options or {}).items())),
           torch.is_grad_enabled(), q.requires_grad or k.requires_grad or v.requires_grad)
    fn = _FLEX_FUNCTIONS.get(key)
    if fn is None:
        def signature_flex(q, k, v, **kw):
            return flex_attention(q, k, v, **kw)

        fn = _FLEX_FUNCTIONS[key] = torch.compile(with_own_code(signature_flex, "flex"), dynamic=False)
    return fn
