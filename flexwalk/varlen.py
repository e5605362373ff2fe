"""Varlen prefill: SketchWalk over a packed batch of sequences in FlashAttention's layout.

`sketchwalk_varlen_attention(q, k, v, cu_seqlens, max_seqlen, config, layer_idx, state)`: q
[total, Hq, D], k, v [total, Hkv, D], sequence i at rows cu_seqlens[i]:cu_seqlens[i + 1].  Each
sequence is what it would be run alone:

- its selection is its own (`fused_selection` on that sequence's rows: the block grid starts at
  its first token), with its own walk across the layers (`VarlenWalkState`);
- sequences shorter than dense_below run dense (causal lists of every block, in the same kernel
  launch), counted `dense_short` each, as a solo run counts;
- one kernel runs every sequence at once over a *block-aligned* layout of the batch: each
  sequence starts at a multiple of the query block (`PackedLayout`), so no block straddles two
  sequences, every listed key block belongs to its query block's sequence, and the plain causal
  mask inside the diagonal blocks is the right one.  flexwalk's Triton kernel reads and writes
  the packed rows in place, each query block shifted to its sequence's rows; FlashAttention 4
  takes a block-aligned copy as a batch of one with the same global block lists; flex takes
  that copy and a BlockMask built from the same lists, whose mask_mod reads a block table
  holding each sequence's selection at its own blocks (the document mask, at block level: no
  token-level tensor of the packed length squared).

Host synchronisation: one, reading cu_seqlens where it is on the GPU (the sequences' lengths
fix how many blocks each selects and where they sit); none where it is a host tensor (vLLM
passes its host copy).  The selections and kernels then run without another.
The residual (config.residual) runs each sequence through `sketchwalk_attention` in turn.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import stats
from .config import SketchWalkConfig
from .kernels import fa4, triton_prefill
from .kernels.flex import (
    block_mask_from_indices,
    bucket_length,
    flex,
    kernel_mask_mod,
    make_mask_mod,
    selection_tables,
    structural_tables,
)
from .options import Options, current_options
from .prefill import prefill_kernel, sketchwalk_attention
from .selection.driver import fused_selection, sketchwalk_selection
from .selection.topk import table_to_indices
from .selection.walk import WalkState


@dataclass(frozen=True)
class VarlenWalkState:
    """The walk of each sequence of a packed batch, carried from one sparse layer to the next
    within one forward pass (pass None at the start of a new one).

    seq_lens: each sequence's length; states: its WalkState, or None where it has none yet
    (no sparse layer so far, or a sequence shorter than dense_below)."""

    seq_lens: tuple[int, ...]
    states: tuple[WalkState | None, ...]

    def check_compatible(self, seq_lens: tuple[int, ...]) -> None:
        if tuple(seq_lens) != self.seq_lens:
            raise ValueError(
                f"state: VarlenWalkState was built for sequence lengths {list(self.seq_lens)}; this layer has "
                f"{list(seq_lens)}. A VarlenWalkState lives for one forward pass: pass state=None to start a new one."
            )


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence of a packed batch sits in the block-aligned layout the kernels run on.

    seq_lens / starts: each sequence's length and first row in the packed input; aligned: its
    first position in the layout (a multiple of `align`, the query block); length: the layout's
    positions (the last sequence's end rounded up to `align`).  Flex and FlashAttention 4 run
    on a block-aligned copy (`to_aligned`, `from_aligned`); flexwalk's Triton kernel reads the
    packed rows in place through `block_bounds`."""

    seq_lens: tuple[int, ...]
    starts: tuple[int, ...]
    aligned: tuple[int, ...]
    length: int
    align: int
    device: torch.device

    @staticmethod
    def build(seq_lens: tuple[int, ...], align: int, device) -> "PackedLayout":
        starts, aligned, pos, at = [], [], 0, 0
        for n in seq_lens:
            starts.append(at)
            aligned.append(pos)
            at += n
            pos += -(-n // align) * align
        return PackedLayout(tuple(seq_lens), tuple(starts), tuple(aligned), pos, align, torch.device(device))

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """[total] int64 on the device: the position in the layout of each packed row."""
        chunks = [torch.arange(a, a + n) for a, n in zip(self.aligned, self.seq_lens)]
        return _to_device(torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long), self.device)

    @functools.cached_property
    def block_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, end), [length / align] int32 each on the device: for each query block of the
        layout, its sequence's aligned start minus its packed start, and its aligned end."""
        both = torch.zeros(2, self.length // self.align, dtype=torch.int32)
        for n, s, a in zip(self.seq_lens, self.starts, self.aligned):
            rows = slice(a // self.align, (a + n + self.align - 1) // self.align)
            both[0, rows], both[1, rows] = a - s, a + n
        both = _to_device(both, self.device)
        return both[0], both[1]

    def to_aligned(self, x: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """[total, H, D] -> [length (default self.length), H, D], zeros between sequences."""
        out = x.new_zeros((self.length if length is None else length,) + tuple(x.shape[1:]))
        return out.index_copy_(0, self.rows, x)

    def from_aligned(self, x: torch.Tensor) -> torch.Tensor:
        """[>= self.length, H, D] -> [total, H, D]: the packed rows back."""
        return x.index_select(0, self.rows)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device; to CUDA from pinned memory, so that the copy does not make
    the host wait for the stream."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def check_varlen_inputs(q, k, v, cu_seqlens, max_seqlen) -> tuple[int, ...]:
    """Validate the packed inputs; returns each sequence's length (one host sync: cu_seqlens)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [total_tokens, heads, head_dim]; got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree in total_tokens "
                         "and head_dim, and k and v in heads")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) for GQA")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        what = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens of type {what} is invalid: allowed a torch.int32 or torch.int64 tensor")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens of shape {tuple(cu_seqlens.shape)} is invalid: allowed a 1-D tensor "
                         "[num_sequences + 1]")
    cu = cu_seqlens.tolist()  # the one host sync
    total = q.shape[0]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0]={cu[0]} is invalid: it must be 0")
    lens = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
    if any(n < 0 for n in lens):
        at = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"cu_seqlens={cu} is invalid: it must be non-decreasing (entry {at + 1} < entry {at})")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens[-1]={cu[-1]} is invalid: it must equal total_tokens={total} (q.shape[0])")
    if max_seqlen is not None:
        if isinstance(max_seqlen, torch.Tensor):
            max_seqlen = int(max_seqlen)
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(lens):
            raise ValueError(f"max_seqlen={max_seqlen!r} is invalid: allowed None or an int >= the longest "
                             f"sequence ({max(lens)})")
    return lens


def _dense_lists(n: int, config: SketchWalkConfig, device):
    """(partial counts, indices, full counts, indices, table) of causal attention over one
    sequence of n tokens: every causal block (a sequence shorter than dense_below)."""
    start = torch.zeros(1, dtype=torch.int32, device=device)
    end = torch.full((1,), n, dtype=torch.int32, device=device)
    maybe, full = structural_tables(n, n, config.block_size, start, end, q_block=config.q_block)
    return (*table_to_indices(maybe & ~full), *table_to_indices(full), maybe)


def _selection_lists(q, k, config, layer_idx, state, scale, process_group, opts):
    """One sequence's selection as (partial counts, indices, full counts, indices, table, walk
    state, kept, causal), q [1, Hq, n, D], k [1, Hkv, n, D]."""
    if process_group is None:
        tables, new_state, kept, causal = fused_selection(q, k, config, layer_idx, state, scale=scale, options=opts)
        # On CUDA the tables may be a selection graph's static outputs, which the next sequence
        # of the same length bucket overwrites before the packed kernel reads them: copy them.
        return (*(t.clone() for t in tables[:5]), new_state, kept, causal)
    selection, new_state = sketchwalk_selection(q, k, config, layer_idx, state, scale=scale,
                                                process_group=process_group)
    partial, full, table, _, _ = selection_tables(selection, bucket_length(q.shape[2]))
    return (*table_to_indices(partial), *table_to_indices(full), table, new_state, selection.kept, selection.causal)


def _global_lists(parts, layout: PackedLayout, config: SketchWalkConfig, nq_total: int, width: int):
    """Per-sequence block lists (local block ids) -> one batch-of-one list over the layout:
    counts [1, nq_total], indices [1, nq_total, width] (global key block ids), for the partial
    and the full blocks.  Rows past the last sequence list nothing."""
    qb, bs = config.q_block, config.block_size
    dev = layout.device
    counts = [torch.zeros(1, nq_total, dtype=torch.int32, device=dev) for _ in range(2)]
    idx = [torch.zeros(1, nq_total, width, dtype=torch.int32, device=dev) for _ in range(2)]
    for s, lists in enumerate(parts):
        n = layout.seq_lens[s]
        if n == 0:
            continue
        r0, nq, nk = layout.aligned[s] // qb, -(-n // qb), -(-n // bs)
        k0 = layout.aligned[s] // bs
        for t, (cnt, ind) in enumerate(((lists[0], lists[1]), (lists[2], lists[3]))):
            counts[t][0, r0:r0 + nq] = cnt.reshape(-1)[:nq]
            w = min(nk, ind.shape[-1])
            idx[t][0, r0:r0 + nq, :w] = ind.reshape(-1, ind.shape[-2], ind.shape[-1])[0, :nq, :w] + k0
    return counts[0], idx[0], counts[1], idx[1]


def _flex_mask(parts, layout: PackedLayout, config: SketchWalkConfig, lists, n_pad: int):
    """The BlockMask of the global lists over n_pad rows.  Its mask_mod (`make_mask_mod`: causal,
    a query sees itself) reads one block table over the whole layout, [1, n_pad / q_block,
    n_pad / block_size], holding each sequence's selection at its own blocks and nothing
    between sequences: since no block straddles two sequences, that table is the document mask
    as well.  Every closure tensor's shape depends on the bucket n_pad alone, so one compiled
    flex kernel serves every batch of that bucket, whatever its sequence lengths."""
    qb, bs = config.q_block, config.block_size
    dev = layout.device
    table = torch.zeros(1, n_pad // qb, n_pad // bs, dtype=torch.bool, device=dev)
    for s, part in enumerate(parts):
        n = layout.seq_lens[s]
        if part is None:
            continue
        nq, nk = -(-n // qb), -(-n // bs)
        r0, k0 = layout.aligned[s] // qb, layout.aligned[s] // bs
        table[0, r0:r0 + nq, k0:k0 + nk] = part[4].reshape(-1, part[4].shape[-2], part[4].shape[-1])[0, :nq, :nk]
    start = torch.zeros(1, dtype=torch.int32, device=dev)
    end = torch.full((1,), n_pad, dtype=torch.int32, device=dev)
    mask_mod = make_mask_mod(block_size=bs, q_block=qb, start=start, end=end, block_table=table)
    return block_mask_from_indices(*lists, mask_mod, (qb, bs), n_pad, n_pad)


def sketchwalk_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    config: SketchWalkConfig,
    layer_idx: int,
    state: VarlenWalkState | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    process_group=None,
    options: Options | None = None,
) -> tuple[torch.Tensor, VarlenWalkState | None]:
    """SketchWalk causal attention of one layer's prefill over a packed batch (FlashAttention's
    varlen layout).

    q: [total, Hq, D]; k, v: [total, Hkv, D] (Hq a multiple of Hkv), post-RoPE; sequence i is
    rows cu_seqlens[i]:cu_seqlens[i + 1] (cu_seqlens: [S + 1] int32 or int64, starting at 0,
    non-decreasing (empty sequences allowed), ending at total).  max_seqlen: the longest
    sequence, or more (FlashAttention's argument; None: not checked).  state: the
    VarlenWalkState of the previous layer of this forward pass (None for the first).  scale,
    softcap, window, process_group, options: as in `sketchwalk_attention`.

    Each sequence equals its own `sketchwalk_attention` run (its selection, its walk, dense
    below dense_below) up to the kernels' rounding.  Returns (out [total, Hq, D], state for the
    next layer).  Counters per sequence as its solo run counts them (sparse_prefill,
    dense_short, dense_layer, ...), plus `varlen_prefill` per call and the kernel's counter
    (fa4_prefill, triton_prefill) per launch.  One host sync where cu_seqlens is on the GPU, none
    where it is a host tensor.
    """
    lens = check_varlen_inputs(q, k, v, cu_seqlens, max_seqlen)
    if not isinstance(config, SketchWalkConfig):
        raise TypeError(f"config must be a SketchWalkConfig, got {type(config).__name__}")
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise ValueError(f"layer_idx={layer_idx!r} is invalid: must be an int >= 0")
    if state is not None:
        if not isinstance(state, VarlenWalkState):
            raise ValueError(f"state of type {type(state).__name__} is invalid: allowed None or a VarlenWalkState")
        state.check_compatible(lens)
    opts = current_options() if options is None else options
    prev = state.states if state is not None else (None,) * len(lens)
    stats.count(stats.VARLEN_PREFILL)
    whole_dense = window is not None or layer_idx < config.dense_layer_count or config.skip_prefill
    if whole_dense or config.uses_residual:
        return _per_sequence(q, k, v, lens, config, layer_idx, prev, state, scale=scale, softcap=softcap,
                             window=window, process_group=process_group, options=opts)

    threshold = config.min_sparse_length(q.device)
    layout = PackedLayout.build(lens, config.q_block, q.device)
    parts, states, kept, causal = [], [], [], []
    for s, n in enumerate(lens):
        if n < threshold:
            if n:
                stats.count(stats.DENSE_SHORT)
            parts.append(_dense_lists(n, config, q.device) if n else None)
            states.append(prev[s])
            continue
        rows = slice(layout.starts[s], layout.starts[s] + n)
        qs, ks = q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None]
        *lists, new_state, kept_s, causal_s = _selection_lists(qs, ks, config, layer_idx, prev[s], scale,
                                                               process_group, opts)
        parts.append(lists)
        states.append(new_state)
        kept.append(kept_s)
        causal.append(causal_s)
        stats.count(stats.SPARSE_PREFILL)
    out = _packed_kernel(q, k, v, parts, layout, config, scale, softcap, opts)
    if kept:
        stats.record_density(layer_idx, torch.stack(kept).sum(0), torch.stack(causal).sum(0))
    return out, VarlenWalkState(lens, tuple(states))


def _packed_kernel(q, k, v, parts, layout: PackedLayout, config: SketchWalkConfig, scale, softcap,
                   opts: Options) -> torch.Tensor:
    """Every sequence's lists in one launch of the chosen kernel over the block-aligned copy."""
    qb, bs = config.q_block, config.block_size
    n_pad = bucket_length(max(layout.length, 1))
    live = [p for p in parts if p is not None]
    if not live:
        return torch.zeros_like(q)
    width = max(-(-n // bs) for n in layout.seq_lens)
    as4 = [t.transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, total, D] views, for the kernel choice
    kernel = prefill_kernel(*as4, config, softcap, None, opts)
    if kernel == "triton":  # the packed rows read and written in place
        p_cnt, p_idx, f_cnt, f_idx = _global_lists(parts, layout, config, layout.length // qb, max(width, 1))
        stats.count(stats.TRITON_PREFILL)
        return triton_prefill.packed_prefill_attention(q, k, v, f_cnt, f_idx, p_cnt, p_idx, *layout.block_bounds,
                                                       layout.length, q_block=qb, kv_block=bs, scale=scale,
                                                       smem=opts.triton_smem_limit)
    if kernel == "flex":  # the copy at the bucket's length: flex pads to it otherwise
        qa, ka, va = (layout.to_aligned(t, n_pad).transpose(0, 1)[None] for t in (q, k, v))
        lists = _global_lists(parts, layout, config, n_pad // qb, n_pad // bs)  # shapes fixed by the bucket
        bm = _flex_mask(parts, layout, config, lists, n_pad)
        out = flex(qa, ka, va, bm, scale=scale, softcap=softcap, block_size=bs, q_block=qb,
                   kernel_mask_mod=kernel_mask_mod())
    else:
        qa, ka, va = (layout.to_aligned(t).transpose(0, 1)[None] for t in (q, k, v))
        p_cnt, p_idx, f_cnt, f_idx = _global_lists(parts, layout, config, layout.length // qb, max(width, 1))
        out = fa4.sparse_prefill_attention(qa, ka, va, f_cnt, f_idx, p_cnt, p_idx, q_block=qb, kv_block=bs,
                                           scale=scale, mask=opts.fa4_mask)
        stats.count(stats.FA4_PREFILL)
    return layout.from_aligned(out[0].transpose(0, 1))


def _per_sequence(q, k, v, lens, config, layer_idx, prev, state, *, scale, softcap, window, process_group,
                  options) -> tuple[torch.Tensor, VarlenWalkState | None]:
    """Each sequence through `sketchwalk_attention` in turn: dense layers (dense_layers, sliding
    windows, skip_prefill) and the residual."""
    out = torch.empty_like(q)
    states, at = [], 0
    for s, n in enumerate(lens):
        if n == 0:
            states.append(prev[s])
            continue
        part = [t[at:at + n].transpose(0, 1)[None] for t in (q, k, v)]
        o, st = sketchwalk_attention(*part, config, layer_idx, prev[s], scale=scale, softcap=softcap, window=window,
                                     process_group=process_group, options=options)
        out[at:at + n] = o[0].transpose(0, 1)
        states.append(st)
        at += n
    if window is not None:  # a sliding-window layer neither reads nor writes the walk
        return out, state
    return out, VarlenWalkState(tuple(lens), tuple(states))
