"""Stage 4: attention kernels.  The functional API `sketchwalk_attention` lives here.

All flex calls go through one compiled function with static shapes; masks are built for
bucketed lengths (block_mask.bucket_length), so flex compiles once per bucket, not once per
prompt length.  Dense fallbacks are explicit, counted in `flexwalk.counters()` and logged once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from . import fa4_prefill, stats, triton_prefill, triton_selection
from .block_mask import (
    _bounds,
    _pad_table,
    block_mask_from_indices,
    bucket_length,
    dense_block_mask,
    has_holes,
    kernel_mask_mod,
    make_mask_mod,
    packed,
    padded_validity,
    selection_block_mask,
    selection_tables,
)
from .config import SketchWalkConfig
from .residual import block_summaries
from .selection import LayerSketch, select, sketch_matrix, sketchwalk_selection
from .sketch import exact_sketch, is_exact
from .walk import WalkState, table_to_indices

# Static shapes, one compile per length bucket (block_mask.bucket_length): automatic dynamic
# shapes miscompile torch 2.13's CPU flex kernel (undeclared cur_kvSplitSize in the C++).
_compiled_flex = torch.compile(flex_attention, dynamic=False)

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


@functools.lru_cache(maxsize=64)
def softcap_score_mod(softcap: float):
    """score_mod for logit soft-capping (Gemma 2): softcap * tanh(score / softcap)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def _kernel_options(block_size: int, device: torch.device, rows_safe: bool = False,
                    q_block: int | None = None) -> dict | None:
    """Triton kernel options of a prefill flex call (CUDA only; None elsewhere).

    The kernel's tiles (BLOCK_M query rows x BLOCK_N keys) must divide the mask's blocks
    (q_block x block_size; q_block defaults to block_size).  Triton's default tiles are 128 x 64
    or 128 x 128 (an H100 at head dim 64), at most 128 x 128, so blocks of 128 tokens and more
    keep them; smaller key blocks get BLOCK_N = block_size and BLOCK_M = the query block, at most
    128 (a 256-row query block runs as two 128-row tiles, each visiting the block's key list).
    rows_safe: every row's first visited tile holds a key it may attend (see `flex`), so the
    kernel may skip its fully-masked-row guards (ROWS_GUARANTEED_SAFE: 1-3% on an H100,
    docs/benchmarks.md)."""
    if device.type != "cuda":
        return None
    opts = {}
    if block_size < 128:
        opts.update(BLOCK_M=min(block_size if q_block is None else q_block, 128), BLOCK_N=block_size)
    if rows_safe:
        opts["ROWS_GUARANTEED_SAFE"] = True
    return opts or None


def flex(q, k, v, block_mask, *, scale=None, softcap=None, block_size=128, decode=False,
         kernel_mask_mod=None, q_block=None, score_mod=None) -> torch.Tensor:
    """Compiled flex_attention with GQA and optional soft-capping; [B, Hq, L, D] out.

    q, k, v are zero-padded to the mask's (bucket) lengths and the output cut back.
    block_size / q_block: the mask's key / query block (q_block None: block_size), for the tiles.
    kernel_mask_mod: a cheaper mask_mod that agrees with block_mask's own on every partial
    block of its tables, for a selection without padding (block_mask.kernel_mask_mod).  It is
    used only where flex surely compiles to its fused kernel (`_kernel_mask_ok`), through a
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
    fn, rows_safe = _compiled_flex, False
    if kernel_mask_mod is not None and _kernel_mask_ok():
        block_mask = copy.copy(block_mask)
        block_mask.mask_mod = kernel_mask_mod
        fn, rows_safe = _kernel_flex(q, k, v, block_mask, scale, softcap), True
    out = fn(
        q,
        k,
        v,
        score_mod=score_mod if score_mod is not None or softcap is None else softcap_score_mod(float(softcap)),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=None if decode else _kernel_options(block_size, q.device, rows_safe, q_block),
    )
    return out[:, :, :L] if Lp != L else out


def _kernel_mask_ok() -> bool:
    """Whether a flex call from here surely runs inductor's fused kernel: not inside another
    dynamo trace (whose backend may be eager), dynamo not disabled, no forced-eager stance."""
    if torch.compiler.is_compiling() or torch._dynamo.config.disable:
        return False
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    return stance == "default"


_KERNEL_FLEX: dict[tuple, object] = {}


def _kernel_flex(q, k, v, block_mask, scale, softcap):
    """flex_attention compiled for one input signature (what its guards check: shapes, strides,
    dtype, constants, grad mode), with a code object of its own."""
    key = (q.device, q.dtype, tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), v.stride(), k is v,
           block_mask.BLOCK_SIZE, tuple(block_mask.kv_indices.shape), scale, softcap, torch.is_grad_enabled(),
           q.requires_grad or k.requires_grad or v.requires_grad)
    fn = _KERNEL_FLEX.get(key)
    if fn is None:
        def kernel_flex(q, k, v, **kw):
            return flex_attention(q, k, v, **kw)

        fn = _KERNEL_FLEX[key] = torch.compile(_with_own_code(kernel_flex, f"kernel_flex_{len(_KERNEL_FLEX)}"),
                                               dynamic=False)
    return fn


def _with_own_code(fn, name: str):
    """fn (closure and defaults kept) under a code object of its own, named `name`: dynamo keeps
    compiled graphs, recompile counts and automatic-dynamic history per code object."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    _COMPILED_CODES.append(code)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    q_offset: int = 0,
    block_size: int = 128,
) -> torch.Tensor:
    """Exact causal attention (+window, +padding, +softcap) without any n x n tensor.

    Plain causal attention goes to SDPA (flash / cuDNN on GPU); anything with a mask or
    soft-capping goes to compiled flex with a dense BlockMask.
    """
    L, S = q.shape[2], k.shape[2]
    if key_valid is None and softcap is None and window is None and q_offset == 0 and L == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    bm = dense_block_mask(
        q.shape[0], L, S, block_size, q.device, key_valid=key_valid, q_offset=q_offset, window=window
    )
    return flex(q, k, v, bm, scale=scale, softcap=softcap, block_size=block_size)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention with an explicit mask [B or 1, 1 or Hq, L, S]: bool (True: attend), or float,
    added to the (soft-capped) logits as SDPA adds it.  Decode passes one row (L = 1).

    Rows with no allowed key (all False, or all -inf) return 0 instead of NaN.
    """
    g = q.shape[1] // k.shape[1]
    boolean = mask.dtype == torch.bool
    if not boolean and not mask.is_floating_point():
        raise ValueError(f"attention mask must be bool or floating point, got {mask.dtype}")
    if softcap is None:
        m = mask if boolean else mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=g != 1)
    else:
        kk = k.repeat_interleave(g, 1) if g != 1 else k
        vv = v.repeat_interleave(g, 1) if g != 1 else v
        s = (q.float() @ kk.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, float("-inf")) if boolean else s + mask.float()
        out = (torch.softmax(s, -1).nan_to_num(0.0) @ vv.float()).to(q.dtype)
    live = mask.any(-1, keepdim=True) if boolean else (mask > float("-inf")).any(-1, keepdim=True)
    return torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _selection_tables(q, k, p, prev_walk, key_valid, config: SketchWalkConfig, layer_idx: int, scale, n_pad: int,
                      seq_len: torch.Tensor | None = None):
    """Selection (steps 1-7, selection.select) and the BlockMask's block indices in one tensor
    function: on CUDA it is compiled with a dynamic length (one graph for every prompt length
    of a length bucket, one more once the bucket changes), fusing ~60 small kernels into a few.
    Returns (partial counts/indices, full counts/indices, padded block table, start, end, walk,
    kept, causal)."""
    sel, walk = select(q, k, config, layer_idx, prev_walk, key_valid=key_valid, scale=scale, p=p, seq_len=seq_len)
    partial, full, table, start, end = selection_tables(sel, n_pad, key_valid=key_valid)
    return (*table_to_indices(partial), *table_to_indices(full), table, start, end, walk, sel.kept, sel.causal)


@functools.lru_cache(maxsize=64)
def _compiled_selection_tables(config: SketchWalkConfig):
    """`_selection_tables` compiled for one configuration.  The length is dynamic (marked per
    call); the configuration is a closure constant, so its ints (block size, budgets) stay static.
    Passed as an argument, automatic dynamic shapes made the block size symbolic as soon as a
    second configuration ran, which inductor cannot tile (CantSplit on n // block_size)."""
    return torch.compile(_own_code(config), dynamic=None)


def _own_code(config: SketchWalkConfig):
    """`_selection_tables` for one configuration, as a function with a code object of its own.

    Dynamo keeps compiled graphs and its automatic-dynamic history per code object: a shared
    one would see the closure's block size change between configurations and make it symbolic
    all the same."""

    def selection_tables(q, k, p, prev_walk, key_valid, layer_idx, scale, n_pad, seq_len=None):
        return _selection_tables(q, k, p, prev_walk, key_valid, config, layer_idx, scale, n_pad, seq_len=seq_len)

    return _with_own_code(selection_tables, f"selection_tables_{len(_COMPILED_CODES)}")


_COMPILED_CODES: list = []


def _mark_length_dynamic(q, k, prev, key_valid) -> None:
    for t, dims in ((q, (2,)), (k, (2,)), (prev, (1, 2)), (key_valid, (1,))):
        if t is not None:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(t, dim)
# CPU runs the eager function (cheap there, and CPU inductor with dynamic shapes is fragile);
# tests set this to compile on CPU too.
COMPILE_SELECTION_ON_CPU = False


# CUDA graphs of the selection (one per length bucket, batch, head dim, configuration and
# walk input), replayed with one launch: the compiled dynamic-length selection costs ~1 ms of
# host time per layer, more than the sparse attention it selects for below ~16K tokens.  What
# a graph captures (docs/benchmarks.md 4b, 4g; H100, 8B shape, block 128):
# - TRITON_SELECTION (the default where it applies: CUDA, a sketched walk, at most 4096 blocks
#   per row): flexwalk.triton_selection's kernels, compiled by Triton in under a second per
#   configuration and power-of-two block count; one pass over q and k (block_parts) before
#   each replay feeds the graph.  Selection (session 24, FA4 layer) 0.067 ms at 8K, 0.153 ms
#   at 32K, 0.51 ms at 128K: 19% / 4.6-4.7% / 1.1% of the layer (batch 1); 0.23 ms at 32K
#   before that pass (docs/benchmarks.md 4m, 4n).  Above GRAPH_SELECTION_MAX_TOKENS, and for
#   head_scoring="per_head" (never graphed), it runs without a graph, instead of the compiled
#   selection.
# - COMPILE_GRAPHED_SELECTION: the selection compiled by inductor for the bucket's static shapes
#   (about a dozen fused kernels; 0.14 ms at 8K), but every new bucket first compiles for
#   7-72 s (once per machine: inductor caches on disk).  Takes precedence when set.
# - Otherwise the eager torch selection (~140 small kernels, 0.41 ms of GPU time at 8K even
#   inside a graph).
# Buckets above GRAPH_SELECTION_MAX_TOKENS get no graph: a graph's private intermediates
# ([B, nb, nb] a few times, kept for good) grow with the square of the length (about 20 MB
# each at 128K with 64-token blocks).
GRAPH_SELECTION = True
COMPILE_GRAPHED_SELECTION = False
TRITON_SELECTION = True
TRITON_SELECTION_ON_CPU = False  # tests: the Triton selection through triton's interpreter
GRAPH_SELECTION_MAX_TOKENS = 131072
_GRAPH_POOL = None
_SELECTION_GRAPHS: dict[tuple, "_SelectionGraph"] = {}


class _SelectionGraph:
    """The selection captured in a CUDA graph for one static key, on bucket-padded inputs.

    kind "triton": the static inputs are `triton_selection.block_parts`' per-block sums of q and k
    ([B, G, nb, D] fp32, a few hundred KB), the blocks' valid counts, the real length n (0-d),
    the validity [B, n_pad] (only for a padded batch; without padding every row's keys are [0,
    n) and the bounds kernel does not run), the layer's SRHT matrix and the previous walk.
    Before each replay one `block_parts` launch reads q and k once and writes the sums, counts,
    n, the validity and the previous walk straight into them (`fill`); P too for a sketch
    narrower than the head dim (the default exact sketch is the same in every layer and the
    kernels skip it).  The walk and the density sums come out in one buffer (`kept_outputs`
    copies them in one copy).
    Other kinds (`_selection_tables` eager or compiled): head-mean q and k [B, 1, n_pad, D]
    fp32, computed by torch.mean into the static inputs, and the validity.
    Outputs are the graph's own buffers, overwritten by the next replay: callers consume them
    in stream order (the BlockMask) or copy them out (walk, density counts: `kept_outputs`).  compiled: capture
    the selection compiled for these static shapes, with a code object of its own (it never
    recompiles: the graph replays it), instead of the eager one.  capture=False builds the
    buffers only (CPU tests of `fill` and `_run`, the graph's two halves).
    """

    def __init__(self, bsz: int, n_pad: int, hq: int, hk: int, d: int, r: int, config: SketchWalkConfig,
                 has_prev: bool, padded: bool, scale: float | None, device: torch.device, kind: str = "torch",
                 capture: bool = True):
        global _GRAPH_POOL
        nb = n_pad // config.block_size  # the walk's blocks (block_size, whatever the query block)
        f32 = dict(device=device, dtype=torch.float32)
        if kind == "triton":
            gq, gk = triton_selection.parts_groups(hq, hk)
            self.qp, self.kp = torch.zeros(bsz, gq, nb, d, **f32), torch.zeros(bsz, gk, nb, d, **f32)
            self.counts = torch.zeros(bsz, nb, **f32)
            self.valid = torch.ones(bsz, n_pad, dtype=torch.bool, device=device) if padded else None
        else:
            self.qm = torch.zeros(bsz, 1, n_pad, d, **f32)
            self.km = torch.zeros(bsz, 1, n_pad, d, **f32)
            self.valid = torch.ones(bsz, n_pad, dtype=torch.bool, device=device)
        self.heads = (hq, hk)
        self.n = torch.full((), n_pad, dtype=torch.int64, device=device)
        # the exact sketch ([I 0], the default) is the same for every layer and the Triton
        # kernels skip its product: fill writes P only for a narrower sketch
        self.exact = kind == "triton" and is_exact(d, r)
        self.p = exact_sketch(d, device).clone() if self.exact else torch.zeros(d, r, **f32)
        self.prev = torch.eye(nb, **f32).expand(bsz, nb, nb).contiguous() if has_prev else None
        self.args = (config, 0, scale, n_pad)
        self.kind = kind
        self.fn = torch.compile(_own_code(config), dynamic=False) if kind == "compiled" else None
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
                                                           self.prev, self.valid, config, scale, n_pad, self.n)
        if self.fn is not None:
            return self.fn(self.qm, self.km, self.p, self.prev, self.valid, layer_idx, scale, n_pad, self.n)
        return _selection_tables(self.qm, self.km, self.p, self.prev, self.valid, config, layer_idx, scale, n_pad,
                                 seq_len=self.n)

    def fill(self, q, k, p, prev, key_valid) -> None:
        """Write one layer's inputs into the static ones (stream-ordered, no host sync)."""
        n = q.shape[2]
        if self.kind == "triton":  # one launch: the sums, counts, n, validity and previous walk
            triton_selection.block_parts(q, k, key_valid, self.args[0].block_size, self.counts.shape[1],
                                         out=(self.qp, self.kp, self.counts), valid_out=self.valid, n_out=self.n,
                                         prev=prev, prev_out=None if prev is None else self.prev)
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


def _graphable(q, config: SketchWalkConfig, n_pad: int) -> bool:
    return (GRAPH_SELECTION and q.device.type == "cuda" and n_pad <= GRAPH_SELECTION_MAX_TOKENS
            and config.head_scoring == "mean" and config.walk != "oracle" and n_pad % config.q_block == 0
            and not torch.cuda.is_current_stream_capturing())


def _triton_selection(config: SketchWalkConfig, n_pad: int, device) -> bool:
    return TRITON_SELECTION and triton_selection.supported(config, n_pad, device)


def _selection_graph(q, k, p, config: SketchWalkConfig, has_prev: bool, padded: bool, scale,
                     n_pad: int) -> _SelectionGraph:
    kind = ("compiled" if COMPILE_GRAPHED_SELECTION
            else "triton" if _triton_selection(config, n_pad, q.device) else "torch")
    heads = (q.shape[1], k.shape[1]) if kind == "triton" else (1, 1)
    padded = padded or kind != "triton"  # only the Triton graph has an unpadded variant
    key = (q.device, q.shape[0], n_pad, heads, q.shape[3], p.shape[1], config, has_prev, padded, scale, kind)
    g = _SELECTION_GRAPHS.get(key)
    if g is None:
        g = _SELECTION_GRAPHS[key] = _SelectionGraph(q.shape[0], n_pad, *heads, q.shape[3], p.shape[1], config,
                                                     has_prev, padded, scale, q.device, kind)
        stats.count(stats.SELECTION_GRAPH_CAPTURE)
    return g


def fused_selection(q, k, config: SketchWalkConfig, layer_idx: int, state: WalkState | None, *, key_valid=None,
                    scale=None) -> tuple[tuple, WalkState, torch.Tensor, torch.Tensor]:
    """One prefill layer's selection as the BlockMask's tables, no host sync: ((partial counts,
    partial indices, full counts, full indices, selection table, start, end), walk state, kept,
    causal), over bucket_length(n) tokens.  On CUDA a graph replays it (per length bucket);
    otherwise Triton (TRITON_SELECTION), the inductor-compiled selection, or on CPU torch ops."""
    bsz, _, n, d = q.shape
    if state is not None:
        state.check_compatible(bsz, n, config.block_size)
    n_pad = bucket_length(n)
    p = sketch_matrix(config, layer_idx, d, q.device)
    prev = None if state is None else state.transition
    scale = None if scale is None else float(scale)
    if _graphable(q, config, n_pad):
        graph = _selection_graph(q, k, p, config, prev is not None, key_valid is not None, scale, n_pad)
        out = graph(q, k, p, prev, key_valid)
        walk, kept, causal = graph.kept_outputs()  # outlive the next replay
        if graph.kind == "triton":
            stats.count(stats.TRITON_SELECTION)
    elif (q.device.type == "cuda" or TRITON_SELECTION_ON_CPU) and _triton_selection(config, n_pad, q.device):
        out = triton_selection.selection_tables(q, k, p, prev, key_valid, config, scale, n_pad)
        walk, kept, causal = out[7:]
        stats.count(stats.TRITON_SELECTION)
    else:
        # The oracle (an evaluation tool, O(n^2) anyway) stays eager: its chunk loop over the
        # dynamic length made inductor spend about 6 minutes per process at 32K on an H100.
        if (q.device.type == "cuda" or COMPILE_SELECTION_ON_CPU) and config.walk != "oracle":
            _mark_length_dynamic(q, k, prev, key_valid)
            out = _compiled_selection_tables(config)(q, k, p, prev, key_valid, layer_idx, scale, n_pad)
        else:
            out = _selection_tables(q, k, p, prev, key_valid, config, layer_idx, scale, n_pad)
        walk, kept, causal = out[7:]
    state = WalkState(transition=walk, layer_idx=layer_idx, block_size=config.block_size, seq_len=n)
    return out[:7], state, kept, causal


def tables_block_mask(tables: tuple, config: SketchWalkConfig, n_pad: int) -> BlockMask:
    """The BlockMask of `fused_selection`'s tables over n_pad tokens."""
    p_cnt, p_idx, f_cnt, f_idx, table, start, end = tables
    bs, qb = config.block_size, config.q_block
    # fresh standard-layout copies: the compiled flex kernel specialises on these tensors
    start, end, table = (packed(t) for t in (start, end, table))
    mask_mod = make_mask_mod(block_size=bs, q_block=qb, start=start, end=end, block_table=table)
    return block_mask_from_indices(p_cnt, p_idx, f_cnt, f_idx, mask_mod, (qb, bs), n_pad, n_pad)


def fused_selection_mask(q, k, config: SketchWalkConfig, layer_idx: int, state: WalkState | None, *,
                         key_valid=None, scale=None) -> tuple[BlockMask, WalkState, torch.Tensor, torch.Tensor]:
    """The selection's BlockMask for one prefill layer: (mask, walk state, kept, causal)."""
    tables, state, kept, causal = fused_selection(q, k, config, layer_idx, state, key_valid=key_valid, scale=scale)
    return tables_block_mask(tables, config, bucket_length(q.shape[2])), state, kept, causal


# Where prefill computes the dense tail (config.dense_tail_blocks) with a dense kernel of its
# own, on a side stream, outside the block-sparse one (_with_dense_tail): "cuda" (on CUDA from
# SPLIT_DENSE_TAIL_MIN_TOKENS up), True (everywhere: tests of the logic on CPU) or False
# (always inside: benchmarks compare).  H100, 8B attention shape, one layer (docs/benchmarks.md
# 4e): 1.96 -> 1.76 ms at 16K, 5.48 -> 5.04 ms at 32K, 72.6 -> 69.4 ms at 128K; but at 8K,
# where the layer is bound by the host's launch rate, the extra launches cost 0.5 ms or more.
SPLIT_DENSE_TAIL: bool | str = "cuda"
SPLIT_DENSE_TAIL_MIN_TOKENS = 16384


def dense_tail_start(config: SketchWalkConfig, n: int, device: torch.device | str) -> int | None:
    """The first kernel query block of the dense tail (config.dense_tail_blocks last real
    query blocks, which keep every causal key block) if prefill computes it apart for this
    length and device (SPLIT_DENSE_TAIL), else None."""
    on_cuda = torch.device(device).type == "cuda" and n >= SPLIT_DENSE_TAIL_MIN_TOKENS
    split = SPLIT_DENSE_TAIL is True or (SPLIT_DENSE_TAIL == "cuda" and on_cuda)
    if not config.dense_tail_blocks or not split:
        return None
    return max(-(-n // config.q_block) - config.dense_tail_blocks, 0)


def _rows_dropped(bm: BlockMask, r0: int) -> BlockMask:
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
    out = flex(q, k, v, _rows_dropped(bm, r0), kernel_mask_mod=fast_mask_mod, **tiles)
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


# The kernel of a sparse prefill layer: "fa4" (FlashAttention 4's block-sparse CuTe kernel,
# flexwalk.fa4_prefill, where flash_attn.cute is installed), "triton" (flexwalk.triton_prefill:
# longest query blocks first, heads fastest; the dense tail needs no split), "flex" (compiled
# flex_attention on the BlockMask) or "auto": fa4 where FA4_AUTO and fa4_prefill.supported say
# (installed, Hopper, a measured shape: 1.40x the Triton kernel at 128K on an H100), else triton on CUDA for
# the shapes where it was measured faster than flex (TRITON_AUTO_SHAPES: head dim 128 with
# 128-token query and key blocks, 3-7% at 32K-128K, 21% at 8K on an H100), flex elsewhere
# (head dim 64 with 64-token blocks: flex 6-14% faster; 128 x 64 blocks: level).
# docs/benchmarks.md 4f, 4k and 4l.  Where a kernel does not apply (fa4: padding, the residual, no
# flash_attn.cute; triton: soft-capping, grad, inside a torch.compile trace, no triton) the next
# one runs whatever the setting: fa4, then triton, then flex.
PREFILL_KERNEL = "auto"
PREFILL_KERNELS = ("auto", "fa4", "triton", "flex")
TRITON_AUTO_SHAPES = {(128, 128, 128)}  # (head dim, query block, key block)
FA4_AUTO = True  # "auto" takes FA4 where installed and supported (fa4_prefill.SHAPES on Hopper); False: never


def _check_kernel() -> None:
    if PREFILL_KERNEL not in PREFILL_KERNELS:
        raise ValueError(f"flexwalk.attention.PREFILL_KERNEL={PREFILL_KERNEL!r}: allowed {', '.join(PREFILL_KERNELS)}")


def _flex_only(q, k, v) -> bool:
    """Inside a torch.compile trace, or with tensors that need grad: neither the Triton kernel nor
    FA4 applies (no backward, not traceable), so flex runs."""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _use_fa4_prefill(q, k, v, config: SketchWalkConfig, softcap, key_valid) -> bool:
    _check_kernel()
    if PREFILL_KERNEL in ("flex", "triton") or (PREFILL_KERNEL == "auto" and not FA4_AUTO):
        return False
    if config.uses_residual or _flex_only(q, k, v):
        return False
    return fa4_prefill.supported(q, k, q_block=config.q_block, kv_block=config.block_size, softcap=softcap,
                                 padded=key_valid is not None)


def _use_triton_prefill(q, k, v, config: SketchWalkConfig, softcap) -> bool:
    _check_kernel()
    if PREFILL_KERNEL == "flex":
        return False
    if PREFILL_KERNEL in ("auto", "fa4") and (q.device.type != "cuda"
                                     or (q.shape[-1], config.q_block, config.block_size) not in TRITON_AUTO_SHAPES):
        return False
    if _flex_only(q, k, v):
        return False
    return triton_prefill.supported(q, q_block=config.q_block, kv_block=config.block_size, softcap=softcap)


def prefill_kernel(q, k, v, config: SketchWalkConfig, softcap=None, key_valid=None) -> str:
    """The kernel `sparse_prefill` runs for this call: "fa4", "triton" or "flex" (PREFILL_KERNEL,
    FA4_AUTO and what each kernel supports; see above)."""
    if _use_fa4_prefill(q, k, v, config, softcap, key_valid):
        return "fa4"
    return "triton" if _use_triton_prefill(q, k, v, config, softcap) else "flex"


def _residual_flex(q, k, v, bm: BlockMask, res: tuple, config: SketchWalkConfig, start, end, tiles,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Compiled flex over the selection plus the residual's summaries (flexwalk.residual), in one
    call: the summaries are appended to the keys and values after the bucket's n_pad tokens
    (nb of them, in ceil(nb / block_size) extra key blocks), each query block's partial list
    gains the summary blocks before it, the mask_mod admits summary j for query q when key
    block j lies wholly before q's query block, was not selected and holds a real key, and
    the score_mod adds log(count) to the summaries' logits.  valid: [B, n] key validity, for
    padding with holes."""
    k_mean, v_mean, log_count, table = res
    bs, qb = config.block_size, config.q_block
    n = k.shape[2]
    n_pad = bm.seq_lengths[0]
    nbp = table.shape[-1]  # key blocks of the bucket (n_pad / bs)
    extra_blocks = -(-nbp // bs)
    kk = torch.cat([F.pad(k, (0, 0, 0, n_pad - n)), F.pad(k_mean, (0, 0, 0, extra_blocks * bs - nbp))], 2)
    vv = torch.cat([F.pad(v, (0, 0, 0, n_pad - n)), F.pad(v_mean, (0, 0, 0, extra_blocks * bs - nbp))], 2)
    p_cnt, p_idx = bm.kv_num_blocks[:, 0], bm.kv_indices[:, 0]
    nq, width = p_idx.shape[1], p_idx.shape[2]
    rows = torch.arange(nq, device=q.device)
    extra = -(-(rows * (qb // bs)) // bs)  # summary blocks holding the key blocks before each query block
    pos = torch.arange(width + extra_blocks, device=q.device)
    rel = pos[None, None, :] - p_cnt[..., None]
    use = (rel >= 0) & (rel < extra[None, :, None])
    idx = torch.where(use, n_pad // bs + rel, F.pad(p_idx, (0, extra_blocks))).to(torch.int32)
    f_idx = F.pad(bm.full_kv_indices[:, 0], (0, extra_blocks))
    tok_mask = make_mask_mod(block_size=bs, q_block=qb, start=packed(start), end=packed(end),
                             block_table=packed(table),
                             valid=None if valid is None else packed(padded_validity(valid, n_pad)))
    has = packed(torch.isfinite(log_count))
    lc = packed(torch.where(torch.isfinite(log_count), log_count, torch.zeros_like(log_count)))
    tbl = packed(table)
    softcap = tiles["softcap"]

    def summary_index(kv_idx):
        """(whether kv_idx is a summary, its key block: 0 where it is not one or past nbp)."""
        summary = kv_idx >= n_pad
        j = torch.where(summary, kv_idx - n_pad, 0)
        return summary, torch.where(j < nbp, j, 0)

    def mask_mod(b, h, q_idx, kv_idx):
        summary, j = summary_index(kv_idx)
        qrow = q_idx // qb
        ok = (j < qrow * (qb // bs)) & ~tbl[b, qrow, j] & has[b, j]
        return torch.where(summary, ok, tok_mask(b, h, q_idx, torch.where(summary, 0, kv_idx)))

    cap = None if softcap is None else softcap_score_mod(float(softcap))

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap(score, b, h, q_idx, kv_idx)
        summary, j = summary_index(kv_idx)
        return score + torch.where(summary, lc[b, j], 0.0)

    rbm = block_mask_from_indices(p_cnt + extra[None].to(p_cnt.dtype), idx, bm.full_kv_num_blocks[:, 0], f_idx,
                                  mask_mod, (qb, bs), n_pad, n_pad + extra_blocks * bs)
    return flex(q, kk, vv, rbm, score_mod=score_mod, **tiles)


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
) -> tuple[torch.Tensor, WalkState]:
    """SketchWalk selection + block-sparse attention for one prefill layer (FlashAttention 4's
    kernel, flexwalk's Triton kernel or compiled flex, as `prefill_kernel` says).  holes: key_valid
    has padding between real tokens; then the torch selection and flex run, whose masks check
    each key (the fused selection's tables and the Triton and FA4 kernels know [start, end) only)."""
    kernel = prefill_kernel(q, k, v, config, softcap, key_valid)
    if holes:
        stats.count(stats.PADDING_HOLES)
        kernel = "flex"
    use_fa4, use_triton = kernel == "fa4", kernel == "triton"
    if sketch is None and process_group is None and not holes:  # the fused (graphed on CUDA) selection-to-tables path
        tables, new_state, kept, causal = fused_selection(q, k, config, layer_idx, state, key_valid=key_valid,
                                                          scale=scale)
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
            table = _pad_table(selection.mask, -(-n_pad // config.q_block), n_pad // config.block_size)
        if use_triton or config.uses_residual:
            start, end = _bounds(q.shape[0], q.shape[2], key_valid, q.device)
    res = None
    if config.uses_residual:  # summaries of the key blocks of the table (residual.py)
        res = (*block_summaries(k, v, start, end, config.block_size, table.shape[-1],
                                key_valid=key_valid if holes else None), table)
        stats.count(stats.RESIDUAL)
    if use_fa4:  # no padding and no residual here (_use_fa4_prefill): the lists alone say it all
        if bm is None:
            p_cnt, p_idx, f_cnt, f_idx = tables[:4]
        else:
            p_cnt, p_idx, f_cnt, f_idx = bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices
        out = fa4_prefill.sparse_prefill_attention(q, k, v, f_cnt, f_idx, p_cnt, p_idx, q_block=config.q_block,
                                                   kv_block=config.block_size, scale=scale)
        stats.count(stats.FA4_PREFILL)
    elif use_triton:
        if bm is None:  # the tables themselves: no BlockMask, bounds as the selection computed them
            p_cnt, p_idx, f_cnt, f_idx = tables[:4]
            out = triton_prefill.sparse_prefill_attention(
                q, k, v, f_cnt, f_idx, p_cnt, p_idx, start, end, q_block=config.q_block,
                kv_block=config.block_size, scale=scale, residual=res)
        else:
            out = triton_prefill.block_mask_attention(q, k, v, bm, start, end, scale=scale, residual=res)
        stats.count(stats.TRITON_PREFILL)
    else:
        tiles = dict(scale=scale, softcap=softcap, block_size=config.block_size, q_block=config.q_block)
        fast = kernel_mask_mod() if key_valid is None else None
        r0 = dense_tail_start(config, q.shape[2], q.device)
        if res is not None:  # the summaries as extra keys of the same call (the tail is not split off)
            out = _residual_flex(q, k, v, bm, res, config, start, end, tiles,
                                 valid=key_valid if holes else None)
        elif r0 is None:
            out = flex(q, k, v, bm, kernel_mask_mod=fast, **tiles)
        else:
            out = _with_dense_tail(q, k, v, bm, r0, key_valid, fast, tiles)
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
) -> tuple[torch.Tensor, WalkState | None]:
    """SketchWalk causal attention of one layer's prefill, no transformers needed.

    q: [B, Hq, n, D]; k, v: [B, Hkv, n, D] (Hq a multiple of Hkv); the same n for all three.
    key_valid: [B, n] bool, False at padding tokens, anywhere (left, right or holes between real
    tokens: padding never enters a block mean, a block without a real token is chosen only as a
    forced block, and no query attends a padding key).  state: the WalkState returned by the
    previous layer of the same forward pass (None for the first).  window: a sliding-window
    layer's window (it keeps its window, dense inside it).  holes: whether key_valid has padding
    between real tokens (`block_mask.has_holes`); None finds out (one host sync), callers that
    know it once per forward pass say so.  Prefill with holes runs on flex (counted as
    `padding_holes`): the Triton and FlashAttention 4 kernels take left/right padding only.
    sketch: this layer's `layer_sketch(...)` if the caller needs it too
    (a decode state is built from it).  process_group: tensor parallelism, this rank holding
    an equal share of the heads (q, k, v are its heads): one all-reduce of the block means
    per layer makes every rank select the blocks a single process with all heads would.
    Returns (out [B, Hq, n, D],
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
        process_group=process_group, holes=holes,
    )
