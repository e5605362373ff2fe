"""Selection, the run: one prefill layer's q and k (+ the walk state) -> the kept blocks.

`select` chains the three stages (sketch, walk, top-k) in torch ops; it is the one rule of the
eager path (`sketchwalk_selection`, which the oracle calls too) and of the fused paths, so they
can only differ in how they compute, never in what they select.  `fused_selection` runs it
straight into the BlockMask's tables without a host sync, in the fastest form that applies:

- a CUDA graph per length bucket (graph_selection), replaying flexwalk's Triton selection
  (flexwalk.kernels.triton_selection), the inductor-compiled torch selection or the eager one;
- the Triton selection without a graph (long prompts, or triton's interpreter on CPU);
- the torch selection, compiled with a dynamic length on CUDA, eager on CPU.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask

from .. import stats
from ..compiled import with_own_code
from ..config import SketchWalkConfig
from ..options import Options, current_options
from ..kernels import triton_selection
from ..kernels.flex import bucket_length, selection_tables, tables_block_mask
from .sketch import LayerSketch, exact_sketch, is_exact, layer_sketch, sketch_matrix
from .topk import BlockSelection, select_blocks, short_rows, table_to_indices
from .walk import WalkState, oracle_block_mass, walk_combine


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
    """Sketch, walk and top-k on tensors only: (selection, walk matrix R_l).  prev_walk: R_{l-1} or None.

    The one selection rule of the eager path (sketchwalk_selection) and of the fused,
    compiled or CUDA-graphed prefill path (`torch_selection_tables`).  seq_len: a 0-d
    tensor of real tokens when q, k are padded to a bucket (key_valid False past it).  Rows of a
    padded batch with fewer real tokens than dense_below keep every causal block (`short_rows`)."""
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
    return select_blocks(walk, sketch.allowed, sketch.block_valid, config, n, short_rows(key_valid, config, n)), walk


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


def torch_selection_tables(q, k, p, prev_walk, key_valid, config: SketchWalkConfig, layer_idx: int, scale, n_pad: int,
                           seq_len: torch.Tensor | None = None):
    """The torch selection (`select`) and the BlockMask's block indices in one tensor
    function: on CUDA it is compiled with a dynamic length (one graph for every prompt length
    of a length bucket, one more once the bucket changes), fusing ~60 small kernels into a few.
    Returns (partial counts/indices, full counts/indices, padded block table, start, end, walk,
    kept, causal)."""
    sel, walk = select(q, k, config, layer_idx, prev_walk, key_valid=key_valid, scale=scale, p=p, seq_len=seq_len)
    partial, full, table, start, end = selection_tables(sel, n_pad, key_valid=key_valid)
    return (*table_to_indices(partial), *table_to_indices(full), table, start, end, walk, sel.kept, sel.causal)


@functools.lru_cache(maxsize=64)
def _compiled_selection_tables(config: SketchWalkConfig):
    """`torch_selection_tables` compiled for one configuration.  The length is dynamic (marked per
    call); the configuration is a closure constant, so its ints (block size, budgets) stay static.
    Passed as an argument, automatic dynamic shapes made the block size symbolic as soon as a
    second configuration ran, which inductor cannot tile (CantSplit on n // block_size)."""
    return torch.compile(own_selection_tables(config), dynamic=None)


def own_selection_tables(config: SketchWalkConfig):
    """`torch_selection_tables` for one configuration, as a function with a code object of its own.

    Dynamo keeps compiled graphs and its automatic-dynamic history per code object: a shared
    one would see the closure's block size change between configurations and make it symbolic
    all the same."""

    def selection_tables(q, k, p, prev_walk, key_valid, layer_idx, scale, n_pad, seq_len=None):
        return torch_selection_tables(q, k, p, prev_walk, key_valid, config, layer_idx, scale, n_pad, seq_len=seq_len)

    return with_own_code(selection_tables, "selection_tables")


def _mark_length_dynamic(q, k, prev, key_valid) -> None:
    for t, dims in ((q, (2,)), (k, (2,)), (prev, (1, 2)), (key_valid, (1,))):
        if t is not None:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(t, dim)




# CUDA graphs of the selection (one per length bucket, batch, head dim, configuration and
# walk input), replayed with one launch: the compiled dynamic-length selection costs ~1 ms of
# host time per layer, more than the sparse attention it selects for below ~16K tokens.  What
# a graph captures (Options.graph_selection; docs/benchmarks.md 4b, 4g; H100, 8B shape, block 128):
# - the Triton selection (Options.triton_selection, the default where it applies: CUDA, a
#   sketched walk, at most 4096 blocks per row): kernels.triton_selection's kernels, compiled by
#   Triton in under a second per configuration and power-of-two block count; one pass over q
#   and k (block_parts) before each replay feeds the graph.  Selection (FA4 layer) 0.067 ms at
#   8K, 0.153 ms at 32K, 0.51 ms at 128K: 19% / 4.6-4.7% / 1.1% of the layer (batch 1); 0.23 ms
#   at 32K before that pass (docs/benchmarks.md 4m, 4n).  Above graph_selection_max_tokens, and
#   for head_scoring="per_head" (never graphed), it runs without a graph, instead of the
#   compiled selection.  prefill_scoring="bound" adds the head-mean keys' block extremes to the
#   static inputs (one Triton launch before each replay, triton_selection.bucket_key_bounds).
# - Options.compile_graphed_selection: the selection compiled by inductor for the bucket's
#   static shapes (about a dozen fused kernels; 0.14 ms at 8K), but every new bucket first
#   compiles for 7-72 s (once per machine: inductor caches on disk).  Takes precedence when set.
# - Otherwise the eager torch selection (~140 small kernels, 0.41 ms of GPU time at 8K even
#   inside a graph).
# Buckets above graph_selection_max_tokens get no graph: a graph's private intermediates
# ([B, nb, nb] a few times, kept for good) grow with the square of the length (about 20 MB
# each at 128K with 64-token blocks).
_GRAPH_POOL = None


_SELECTION_GRAPHS: dict[tuple, "SelectionGraph"] = {}


class SelectionGraph:
    """The selection captured in a CUDA graph for one static key, on bucket-padded inputs.

    kind "triton": the static inputs are `triton_selection.block_parts`' per-block sums of q and k
    ([B, G, nb, D] fp32, a few hundred KB), the blocks' valid counts, the real length n (0-d),
    the validity [B, n_pad] (only for a padded batch; without padding every row's keys are [0,
    n) and the bounds kernel does not run), the layer's SRHT matrix and the previous walk.
    Before each replay one `block_parts` launch reads q and k once and writes the sums, counts,
    n, the validity and the previous walk straight into them (`fill`); P too for a sketch
    narrower than the head dim (the default exact sketch is the same in every layer and the
    kernels skip it).  prefill_scoring="bound" adds the head-mean keys' block extremes [B, 1, nb,
    2D] (`triton_selection.bucket_key_bounds`, written by `fill`) and always holds the exact
    sketch (the query blocks' means).  The walk and the density sums come out in one buffer
    (`kept_outputs` copies them in one copy).
    Other kinds (`torch_selection_tables` eager or compiled): head-mean q and k [B, 1, n_pad, D]
    fp32, computed by torch.mean into the static inputs, and the validity.
    Outputs are the graph's own buffers, overwritten by the next replay: callers consume them
    in stream order (the BlockMask) or copy them out (walk, density counts: `kept_outputs`).  compiled: capture
    the selection compiled for these static shapes, with a code object of its own (it never
    recompiles: the graph replays it), instead of the eager one.  capture=False builds the
    buffers only (CPU tests of `fill` and `_run`, the graph's two halves).
    """

    def __init__(self, bsz: int, n_pad: int, hq: int, hk: int, d: int, r: int, config: SketchWalkConfig,
                 has_prev: bool, padded: bool, scale: float | None, device: torch.device, kind: str = "torch",
                 capture: bool = True, row_warps: int | None = None):
        global _GRAPH_POOL
        nb = n_pad // config.block_size  # the walk's blocks (block_size, whatever the query block)
        f32 = dict(device=device, dtype=torch.float32)
        if kind == "triton":
            gq, gk = triton_selection.parts_groups(hq, hk)
            self.qp, self.kp = torch.zeros(bsz, gq, nb, d, **f32), torch.zeros(bsz, gk, nb, d, **f32)
            self.counts = torch.zeros(bsz, nb, **f32)
            self.valid = torch.ones(bsz, n_pad, dtype=torch.bool, device=device) if padded else None
            bound = config.prefill_scoring == "bound"
            self.k_bounds = torch.zeros(bsz, 1, nb, 2 * d, **f32) if bound else None
        else:
            self.qm = torch.zeros(bsz, 1, n_pad, d, **f32)
            self.km = torch.zeros(bsz, 1, n_pad, d, **f32)
            self.valid = torch.ones(bsz, n_pad, dtype=torch.bool, device=device)
        self.heads = (hq, hk)
        self.n = torch.full((), n_pad, dtype=torch.int64, device=device)
        # the exact sketch ([I 0], the default) is the same for every layer and the Triton
        # kernels skip its product: fill writes P only for a narrower sketch
        self.exact = kind == "triton" and (is_exact(d, r) or config.prefill_scoring == "bound")
        self.p = exact_sketch(d, device).clone() if self.exact else torch.zeros(d, r, **f32)
        self.prev = torch.eye(nb, **f32).expand(bsz, nb, nb).contiguous() if has_prev else None
        self.args = (config, 0, scale, n_pad)
        self.kind = kind
        self.row_warps = row_warps
        self.fn = torch.compile(own_selection_tables(config), dynamic=False) if kind == "compiled" else None
        if not capture:
            return
        if _GRAPH_POOL is None:
            _GRAPH_POOL = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and warm up outside the capture (allocator, lazy inits)
            self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=_GRAPH_POOL):
            self.out = self._run()

    def _run(self):
        config, layer_idx, scale, n_pad = self.args
        if self.kind == "triton":
            return triton_selection.parts_selection_tables(self.qp, self.kp, self.counts, *self.heads, self.p,
                                                           self.prev, self.valid, config, scale, n_pad, self.n,
                                                           self.row_warps, k_bounds=self.k_bounds)
        if self.fn is not None:
            return self.fn(self.qm, self.km, self.p, self.prev, self.valid, layer_idx, scale, n_pad, self.n)
        return torch_selection_tables(self.qm, self.km, self.p, self.prev, self.valid, config, layer_idx, scale, n_pad,
                                 seq_len=self.n)

    def fill(self, q, k, p, prev, key_valid) -> None:
        """Write one layer's inputs into the static ones (stream-ordered, no host sync)."""
        n = q.shape[2]
        if self.kind == "triton":  # one launch: the sums, counts, n, validity and previous walk
            triton_selection.block_parts(q, k, key_valid, self.args[0].block_size, self.counts.shape[1],
                                         out=(self.qp, self.kp, self.counts), valid_out=self.valid, n_out=self.n,
                                         prev=prev, prev_out=None if prev is None else self.prev)
            if self.k_bounds is not None:
                triton_selection.bucket_key_bounds(k, self.args[0].block_size, key_valid, self.counts.shape[1],
                                                   out=self.k_bounds)
            if not self.exact:
                self.p.copy_(p)
            return
        torch.mean(q, 1, keepdim=True, dtype=torch.float32, out=self.qm[:, :, :n])
        torch.mean(k, 1, keepdim=True, dtype=torch.float32, out=self.km[:, :, :n])
        self.qm[:, :, n:].zero_()
        self.km[:, :, n:].zero_()
        if key_valid is None:
            self.valid[:, :n].fill_(True)
        else:
            self.valid[:, :n].copy_(key_valid)
        self.valid[:, n:].fill_(False)
        self.n.fill_(n)
        self.p.copy_(p)
        if prev is not None:
            self.prev.copy_(prev)

    def __call__(self, q, k, p, prev, key_valid):
        self.fill(q, k, p, prev, key_valid)
        self.graph.replay()
        return self.out

    def kept_outputs(self):
        """A copy of the replay's walk, kept and causal, which outlives the next replay: one copy
        where the Triton kernels wrote the three into one buffer (triton_selection.split_tail)."""
        walk, kept, causal = self.out[7:]
        base = walk._base
        if base is None or kept._base is not base or causal._base is not base:
            return walk.clone(), kept.clone(), causal.clone()
        return triton_selection.split_tail(base.clone(), walk.shape[0], walk.shape[1])


def _graphable(q, config: SketchWalkConfig, n_pad: int, opts: Options) -> bool:
    return (opts.graph_selection and q.device.type == "cuda" and n_pad <= opts.graph_selection_max_tokens
            and config.head_scoring == "mean" and config.walk != "oracle" and n_pad % config.q_block == 0
            and not torch.cuda.is_current_stream_capturing())


def _triton_selection(config: SketchWalkConfig, n_pad: int, device, opts: Options) -> bool:
    return opts.triton_selection and triton_selection.supported(config, n_pad, device)


def _selection_graph(q, k, p, config: SketchWalkConfig, has_prev: bool, padded: bool, scale,
                     n_pad: int, opts: Options) -> SelectionGraph:
    kind = ("compiled" if opts.compile_graphed_selection
            else "triton" if _triton_selection(config, n_pad, q.device, opts) else "torch")
    heads = (q.shape[1], k.shape[1]) if kind == "triton" else (1, 1)
    padded = padded or kind != "triton"  # only the Triton graph has an unpadded variant
    warps = opts.selection_row_warps if kind == "triton" else None
    key = (q.device, q.shape[0], n_pad, heads, q.shape[3], p.shape[1], config, has_prev, padded, scale, kind, warps)
    g = _SELECTION_GRAPHS.get(key)
    if g is None:
        g = _SELECTION_GRAPHS[key] = SelectionGraph(q.shape[0], n_pad, *heads, q.shape[3], p.shape[1], config,
                                                     has_prev, padded, scale, q.device, kind, row_warps=warps)
        stats.count(stats.SELECTION_GRAPH_CAPTURE)
    return g


# Input signatures (config, device type, dtype, heads, walk carried, padded) for which inductor
# failed to compile the torch selection: they run it uncompiled, counted, without compiling again.
_UNCOMPILABLE: set = set()


@functools.cache
def _compile_errors() -> tuple[type[BaseException], ...]:
    import torch._dynamo.exc
    import torch._inductor.exc

    return tuple(e for e in (getattr(torch._inductor.exc, "InductorError", None),
                             getattr(torch._dynamo.exc, "BackendCompilerFailed", None)) if e is not None)


def _compiled_or_none(signature, q, k, p, prev, key_valid, layer_idx, scale, n_pad):
    """The inductor-compiled torch selection's tables, or None where inductor cannot compile it
    (a compiler error, remembered per signature, counted and logged once)."""
    config = signature[0]
    _mark_length_dynamic(q, k, prev, key_valid)
    try:
        out = _compiled_selection_tables(config)(q, k, p, prev, key_valid, layer_idx, scale, n_pad)
    except _compile_errors() as e:
        _UNCOMPILABLE.add(signature)
        stats.count(stats.SELECTION_COMPILE_FAILED)
        stats.log_once(f"selection_compile_failed:{type(e).__name__}", "flexwalk: inductor failed on the torch "
                       "selection (%s: %s); it runs uncompiled for this input signature", type(e).__name__,
                       str(e).splitlines()[0][:300])
        return None
    stats.count(stats.COMPILED_SELECTION)
    return out


def fused_selection(q, k, config: SketchWalkConfig, layer_idx: int, state: WalkState | None, *, key_valid=None,
                    scale=None, options: Options | None = None) -> tuple[tuple, WalkState, torch.Tensor, torch.Tensor]:
    """One prefill layer's selection as the BlockMask's tables, no host sync: ((partial counts,
    partial indices, full counts, full indices, selection table, start, end), walk state, kept,
    causal), over bucket_length(n) tokens.  On CUDA a graph replays it (per length bucket);
    otherwise Triton (Options.triton_selection), the inductor-compiled selection
    (Options.compile_selection), or torch ops.  options: None: `current_options()`.  The tables
    may be the graph's own buffers: valid until the next call in the same length bucket (copy
    them to keep them longer; walk, kept and causal are copies already)."""
    opts = current_options() if options is None else options
    bsz, _, n, d = q.shape
    if state is not None:
        state.check_compatible(bsz, n, config.block_size)
    n_pad = bucket_length(n)
    p = sketch_matrix(config, layer_idx, d, q.device)
    prev = None if state is None else state.transition
    scale = None if scale is None else float(scale)
    if _graphable(q, config, n_pad, opts):
        graph = _selection_graph(q, k, p, config, prev is not None, key_valid is not None, scale, n_pad, opts)
        out = graph(q, k, p, prev, key_valid)
        walk, kept, causal = graph.kept_outputs()  # outlive the next replay
        if graph.kind == "triton":
            stats.count(stats.TRITON_SELECTION)
    elif (q.device.type == "cuda" or opts.triton_selection_on_cpu) and _triton_selection(config, n_pad, q.device, opts):
        out = triton_selection.selection_tables(q, k, p, prev, key_valid, config, scale, n_pad,
                                                row_warps=opts.selection_row_warps)
        walk, kept, causal = out[7:]
        stats.count(stats.TRITON_SELECTION)
    else:
        # The oracle (an evaluation tool, O(n^2) anyway) stays eager: its chunk loop over the
        # dynamic length made inductor spend about 6 minutes per process at 32K on an H100.
        compile_here = opts.compile_selection == "always" or (opts.compile_selection == "cuda"
                                                             and q.device.type == "cuda")
        signature = (config, q.device.type, q.dtype, q.shape[1], k.shape[1], prev is not None, key_valid is not None)
        out = None
        if compile_here and config.walk != "oracle" and signature not in _UNCOMPILABLE:
            out = _compiled_or_none(signature, q, k, p, prev, key_valid, layer_idx, scale, n_pad)
        if out is None:
            out = torch_selection_tables(q, k, p, prev, key_valid, config, layer_idx, scale, n_pad)
        walk, kept, causal = out[7:]
    state = WalkState(transition=walk, layer_idx=layer_idx, block_size=config.block_size, seq_len=n)
    return out[:7], state, kept, causal


def fused_selection_mask(q, k, config: SketchWalkConfig, layer_idx: int, state: WalkState | None, *,
                         key_valid=None, scale=None, options: Options | None = None
                         ) -> tuple[BlockMask, WalkState, torch.Tensor, torch.Tensor]:
    """The selection's BlockMask for one prefill layer: (mask, walk state, kept, causal)."""
    tables, state, kept, causal = fused_selection(q, k, config, layer_idx, state, key_valid=key_valid, scale=scale,
                                                  options=options)
    return tables_block_mask(tables, config, bucket_length(q.shape[2])), state, kept, causal


def fused_block_selection(q, k, config: SketchWalkConfig, layer_idx: int, state: WalkState | None, *,
                          key_valid=None, scale=None, options: Options | None = None
                          ) -> tuple[BlockSelection, WalkState]:
    """The blocks `fused_selection` keeps (what a prefill layer attends: on CUDA the graphed
    Triton selection), as a BlockSelection over the real blocks.  The oracle of a long prompt is
    built from it (`reference.token_mask(..., selection=..., rows=...)`): the torch selection
    (`sketchwalk_selection`) may break a tie at the budget's edge the other way."""
    tables, state, kept, causal = fused_selection(q, k, config, layer_idx, state, key_valid=key_valid, scale=scale,
                                                  options=options)
    n = q.shape[2]
    table = tables[4][:, : -(-n // config.q_block), : -(-n // config.block_size)].bool()
    return BlockSelection(mask=table, block_size=config.block_size, seq_len=n, kept=kept, causal=causal,
                          q_block_size=config.q_block), state
