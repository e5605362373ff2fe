"""Prefill: one layer's SketchWalk attention (`sketchwalk_attention`, the functional API).

A layer runs dense where the configuration says so (dense layers, short prompts, sliding
windows, skip_prefill; counted in `flexwalk.counters()` and logged once), else its selection
(flexwalk.selection) and block-sparse attention over it with the kernel `prefill_kernel`
chooses: FlashAttention 4, flexwalk's Triton kernel or compiled flex.  On flex the dense tail
(the last query blocks, which keep every causal block) may run as a dense call of its own.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask

from . import stats
from .config import SketchWalkConfig
from .options import Options, current_options
from .kernels import fa4, triton_prefill
from .kernels.dense import dense_attention
from .kernels.flex import (
    bucket_length,
    dense_block_mask,
    flex,
    has_holes,
    kernel_mask_mod,
    pad_table,
    row_bounds,
    selection_block_mask,
    tables_block_mask,
)
from .kernels.residual import block_summaries, residual_flex
from .selection.driver import fused_selection, sketchwalk_selection
from .selection.sketch import LayerSketch
from .selection.topk import short_rows
from .selection.walk import WalkState


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, heads, seq, head_dim]; got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in batch, heads and length; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) for GQA"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def dense_tail_start(config: SketchWalkConfig, n: int, device: torch.device | str,
                     options: Options | None = None) -> int | None:
    """The first kernel query block of the dense tail (config.dense_tail_blocks last real
    query blocks, which keep every causal key block) if prefill computes it apart for this
    length and device (Options.split_dense_tail), else None.

    Split on CUDA from split_dense_tail_min_tokens: H100, 8B attention shape, one layer
    (docs/benchmarks.md 4e): 1.96 -> 1.76 ms at 16K, 5.48 -> 5.04 ms at 32K, 72.6 -> 69.4 ms at
    128K; but at 8K, where the layer is bound by the host's launch rate, the extra launches cost
    0.5 ms or more."""
    opts = current_options() if options is None else options
    on_cuda = torch.device(device).type == "cuda" and n >= opts.split_dense_tail_min_tokens
    split = opts.split_dense_tail == "always" or (opts.split_dense_tail == "cuda" and on_cuda)
    if not config.dense_tail_blocks or not split:
        return None
    return max(-(-n // config.q_block) - config.dense_tail_blocks, 0)


def rows_dropped(bm: BlockMask, r0: int) -> BlockMask:
    """bm whose query blocks r0 and after visit no key block (their kernel programs return at once)."""
    rows = torch.arange(bm.kv_num_blocks.shape[-1], device=bm.kv_num_blocks.device) >= r0
    out = copy.copy(bm)
    out.kv_num_blocks = bm.kv_num_blocks.masked_fill(rows, 0)
    if bm.full_kv_num_blocks is not None:
        out.full_kv_num_blocks = bm.full_kv_num_blocks.masked_fill(rows, 0)
    return out


def _with_dense_tail(q, k, v, bm, r0: int, key_valid, fast_mask_mod, tiles) -> torch.Tensor:
    """The prefill output with the dense tail (query blocks r0 on, queries t0 = r0 * q_block to
    n - 1, each against every causal real key) computed by a dense kernel of its own instead
    of inside the block-sparse one.

    In the sparse kernel the tail's query blocks are its longest programs by far (every key
    block against a budget of ~20% of them), and flex launches a head's query blocks in
    ascending order, so the last head's tail starts last and runs alone: 14% of the sparse
    kernel's time at 32K on an H100 (docs/benchmarks.md, 4e).  On CUDA the tail runs on a side
    stream, concurrently with the sparse kernel; elsewhere one after the other.  Without
    padding the tail's mask is the same for every prompt of a length and is built once
    (_dense_tail_mask).  The result is the same attention (the selection's tail rows are
    dense): only the time changes.
    """
    t0 = r0 * tiles["q_block"]
    stream = None
    if q.is_cuda and not torch.compiler.is_compiling():
        main = torch.cuda.current_stream(q.device)
        stream = _tail_stream(q.device)
        stream.wait_stream(main)
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        if key_valid is None:  # the same mask for every prompt of this length: built once
            bs = tiles["block_size"]
            tail_mask = _dense_tail_mask(q.shape[0], q.shape[2] - t0, k.shape[2], bs, t0, q.device)
            tail = flex(q[:, :, t0:], k, v, tail_mask, scale=tiles["scale"], softcap=tiles["softcap"], block_size=bs)
        else:
            tail = dense_attention(q[:, :, t0:], k, v, key_valid=key_valid, scale=tiles["scale"],
                                   softcap=tiles["softcap"], q_offset=t0, block_size=tiles["block_size"])
    out = flex(q, k, v, rows_dropped(bm, r0), kernel_mask_mod=fast_mask_mod, **tiles)
    if stream is not None:
        main.wait_stream(stream)
        tail.record_stream(main)
    if torch.is_grad_enabled() and (out.requires_grad or tail.requires_grad):
        return torch.cat([out[:, :, :t0], tail], 2)  # flex saves its output for the backward
    out[:, :, t0:] = tail
    return out


@functools.lru_cache(maxsize=16)
def _dense_tail_mask(batch: int, q_len: int, kv_len: int, block_size: int, q_offset: int, device) -> BlockMask:
    return dense_block_mask(batch, q_len, kv_len, block_size, device, q_offset=q_offset)


_TAIL_STREAMS: dict = {}


def _tail_stream(device) -> "torch.cuda.Stream":
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _TAIL_STREAMS:
        _TAIL_STREAMS[key] = torch.cuda.Stream(device)
    return _TAIL_STREAMS[key]


# (head dim, query block, key block) where prefill_kernel="auto" takes the Triton kernel on CUDA:
# head dim 128 with 128-token query and key blocks, 3-7% faster than flex at 32K-128K and 21% at
# 8K on an H100; elsewhere flex (head dim 64 with 64-token blocks: flex 6-14% faster; 128 x 64
# blocks: level).  docs/benchmarks.md 4f, 4k and 4l.
TRITON_AUTO_SHAPES = {(128, 128, 128)}


def _flex_only(q, k, v) -> bool:
    """Inside a torch.compile trace, or with tensors that need grad: neither the Triton kernel nor
    FA4 applies (no backward, not traceable), so flex runs."""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _use_fa4_prefill(q, k, v, config: SketchWalkConfig, softcap, key_valid, opts: Options) -> bool:
    kernel = opts.prefill_kernel
    if kernel in ("flex", "triton") or (kernel == "auto" and not opts.fa4_auto):
        return False
    if config.uses_residual or _flex_only(q, k, v):
        return False
    return fa4.supported(q, k, q_block=config.q_block, kv_block=config.block_size, softcap=softcap,
                         padded=key_valid is not None, shapes=opts.fa4_shapes, on_cpu=opts.fa4_on_cpu)


def _use_triton_prefill(q, k, v, config: SketchWalkConfig, softcap, opts: Options) -> bool:
    kernel = opts.prefill_kernel
    if kernel == "flex":
        return False
    if kernel in ("auto", "fa4") and (q.device.type != "cuda"
                                      or (q.shape[-1], config.q_block, config.block_size) not in TRITON_AUTO_SHAPES):
        return False
    if _flex_only(q, k, v):
        return False
    return triton_prefill.supported(q, q_block=config.q_block, kv_block=config.block_size, softcap=softcap,
                                    smem=opts.triton_smem_limit)


def prefill_kernel(q, k, v, config: SketchWalkConfig, softcap=None, key_valid=None,
                   options: Options | None = None) -> str:
    """The kernel `sparse_prefill` runs for this call: "fa4", "triton" or "flex" (Options.prefill_kernel,
    Options.fa4_auto and what each kernel supports)."""
    opts = current_options() if options is None else options
    if _use_fa4_prefill(q, k, v, config, softcap, key_valid, opts):
        return "fa4"
    return "triton" if _use_triton_prefill(q, k, v, config, softcap, opts) else "flex"


def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
    state: WalkState | None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sketch: LayerSketch | None = None,
    process_group=None,
    holes: bool = False,
    options: Options | None = None,
) -> tuple[torch.Tensor, WalkState]:
    """SketchWalk selection + block-sparse attention for one prefill layer (FlashAttention 4's
    kernel, flexwalk's Triton kernel or compiled flex, as `prefill_kernel` says).  holes: key_valid
    has padding between real tokens; then the torch selection and flex run, whose masks check
    each key (the fused selection's tables and the Triton and FA4 kernels know [start, end) only).
    options: the Options of this call (None: `current_options()`)."""
    opts = current_options() if options is None else options
    kernel = prefill_kernel(q, k, v, config, softcap, key_valid, opts)
    if holes:
        stats.count(stats.PADDING_HOLES)
        kernel = "flex"
    use_fa4, use_triton = kernel == "fa4", kernel == "triton"
    short = short_rows(key_valid, config, q.shape[2])
    if short is not None:  # those rows keep every causal block (the selection's rule): counted on the device
        stats.device_counter(stats.DENSE_SHORT_ROWS, q.device).add_(short.sum())
    if sketch is None and process_group is None and not holes:  # the fused (graphed on CUDA) selection-to-tables path
        tables, new_state, kept, causal = fused_selection(q, k, config, layer_idx, state, key_valid=key_valid,
                                                          scale=scale, options=opts)
        bm = None if (use_triton or use_fa4) else tables_block_mask(tables, config, bucket_length(q.shape[2]))
        table, start, end = tables[4:]
    else:  # a decode state is built from this layer's sketch: keep it
        selection, new_state = sketchwalk_selection(
            q, k, config, layer_idx, state, key_valid=key_valid, scale=scale, sketch=sketch,
            process_group=process_group,
        )
        bm = selection_block_mask(selection, key_valid=key_valid)
        kept, causal = selection.kept, selection.causal
        table = start = end = None  # only the Triton kernel and the residual read them
        if config.uses_residual:
            n_pad = bm.seq_lengths[0]
            table = pad_table(selection.mask, -(-n_pad // config.q_block), n_pad // config.block_size)
        if use_triton or config.uses_residual:
            start, end = row_bounds(q.shape[0], q.shape[2], key_valid, q.device)
    res = None
    if config.uses_residual:  # summaries of the key blocks of the table (residual.py)
        res = (*block_summaries(k, v, start, end, config.block_size, table.shape[-1],
                                key_valid=key_valid if holes else None, kernel=opts.summary_kernel), table)
        stats.count(stats.RESIDUAL)
    if use_fa4:  # no padding and no residual here (_use_fa4_prefill): the lists alone say it all
        if bm is None:
            p_cnt, p_idx, f_cnt, f_idx = tables[:4]
        else:
            p_cnt, p_idx, f_cnt, f_idx = bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices
        out = fa4.sparse_prefill_attention(q, k, v, f_cnt, f_idx, p_cnt, p_idx, q_block=config.q_block,
                                           kv_block=config.block_size, scale=scale, mask=opts.fa4_mask)
        stats.count(stats.FA4_PREFILL)
    elif use_triton:
        if bm is None:  # the tables themselves: no BlockMask, bounds as the selection computed them
            p_cnt, p_idx, f_cnt, f_idx = tables[:4]
            out = triton_prefill.sparse_prefill_attention(
                q, k, v, f_cnt, f_idx, p_cnt, p_idx, start, end, q_block=config.q_block,
                kv_block=config.block_size, scale=scale, residual=res, smem=opts.triton_smem_limit)
        else:
            out = triton_prefill.block_mask_attention(q, k, v, bm, start, end, scale=scale, residual=res,
                                                      smem=opts.triton_smem_limit)
        stats.count(stats.TRITON_PREFILL)
    else:
        tiles = dict(scale=scale, softcap=softcap, block_size=config.block_size, q_block=config.q_block)
        fast = kernel_mask_mod() if key_valid is None else None
        r0 = dense_tail_start(config, q.shape[2], q.device, opts)
        if res is not None:  # the summaries as extra keys of the same call (the tail is not split off)
            out = residual_flex(q, k, v, bm, res, config, start, end, tiles, valid=key_valid if holes else None)
        elif r0 is None:
            out = flex(q, k, v, bm, kernel_mask_mod=fast, **tiles)
        else:
            out = _with_dense_tail(q, k, v, bm, r0, key_valid, fast, tiles)
            stats.count(stats.DENSE_TAIL_SPLIT)
    stats.count(stats.SPARSE_PREFILL)
    stats.record_density(layer_idx, kept, causal)
    return out, new_state


def sketchwalk_attention(
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
    window: int | None = None,
    holes: bool | None = None,
    sketch: LayerSketch | None = None,
    process_group=None,
    options: Options | None = None,
) -> tuple[torch.Tensor, WalkState | None]:
    """SketchWalk causal attention of one layer's prefill, no transformers needed.

    q: [B, Hq, n, D]; k, v: [B, Hkv, n, D] (Hq a multiple of Hkv); the same n for all three.
    key_valid: [B, n] bool, False at padding tokens, anywhere (left, right or holes between real
    tokens: padding never enters a block mean, a block without a real token is chosen only as a
    forced block, and no query attends a padding key).  state: the WalkState returned by the
    previous layer of the same forward pass (None for the first).  window: a sliding-window
    layer's window (it keeps its window, dense inside it).  holes: whether key_valid has padding
    between real tokens (`kernels.flex.has_holes`); None finds out (one host sync), callers that
    know it once per forward pass say so.  Prefill with holes runs on flex (counted as
    `padding_holes`): the Triton and FlashAttention 4 kernels take left/right padding only.
    sketch: this layer's `layer_sketch(...)` if the caller needs it too
    (a decode state is built from it).  process_group: tensor parallelism, this rank holding
    an equal share of the heads (q, k, v are its heads): one all-reduce of the block means
    per layer makes every rank select the blocks a single process with all heads would.
    options: the Options of this call (None: `flexwalk.current_options()`).  Returns (out [B, Hq, n, D],
    state for the next layer).  Layers below config.dense_layer_count and lengths below
    config.dense_below run dense; flexwalk.counters() shows which path ran.
    """
    _check_qkv(q, k, v)
    if not isinstance(config, SketchWalkConfig):
        raise TypeError(f"config must be a SketchWalkConfig, got {type(config).__name__}")
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise ValueError(f"layer_idx={layer_idx!r} is invalid: must be an int >= 0")
    n = q.shape[2]
    if k.shape[2] != n:
        raise ValueError(
            f"sketchwalk_attention is for prefill: q has {n} tokens but k has {k.shape[2]}; "
            "use dense_attention(..., q_offset=...) for queries after a cached prefix"
        )
    if key_valid is not None:
        if tuple(key_valid.shape) != (q.shape[0], n) or key_valid.dtype != torch.bool:
            raise ValueError(
                f"key_valid must be a bool tensor [batch, seq] = {(q.shape[0], n)}, got "
                f"{key_valid.dtype} {tuple(key_valid.shape)}"
            )
    if window is not None:
        dense_path = stats.SLIDING_WINDOW
    elif layer_idx < config.dense_layer_count:
        dense_path = stats.DENSE_LAYER
    elif n < config.min_sparse_length(q.device):
        dense_path = stats.DENSE_SHORT
    elif config.skip_prefill:
        dense_path = stats.DENSE_PREFILL
    else:
        dense_path = None
    if dense_path is not None:
        stats.count(dense_path)
        out = dense_attention(q, k, v, key_valid=key_valid, scale=scale, softcap=softcap, window=window,
                              block_size=config.block_size)
        return out, state
    if key_valid is None:
        holes = False
    elif holes is None:
        holes = has_holes(key_valid)
    return sparse_prefill(
        q, k, v, config, layer_idx, state, key_valid=key_valid, scale=scale, softcap=softcap, sketch=sketch,
        process_group=process_group, holes=holes, options=options,
    )
