"""Options: the kernel and runtime choices of flexwalk, in one frozen, validated object.

`SketchWalkConfig` says what the method computes; `Options` says how flexwalk runs it (which
kernel, CUDA graphs or not, ...): no option changes which blocks are selected, only the code
that computes the same attention.  Three ways to set them:

    with flexwalk.options(prefill_kernel="triton"):   # for a scope (nests; restored on exit)
        model(ids)
    flexwalk.configure(model, decode_graphs=False)     # for one model (stored on its modules)
    flexwalk.current_options()                         # the options in force here
    flexwalk.options.set_options(decode_graphs=False)  # for the rest of this thread (scripts)

Inside a model, its configured fields apply over the defaults and a scope's fields over both.
The attention functions read the options once per call and hand them down.  `flexwalk.options`
is this module, callable as the scope (`options`), so `flexwalk.options.Options` names the class.  An unknown field
or value raises ValueError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterator

PREFILL_KERNELS = ("auto", "fa4", "triton", "flex")
DECODE_KERNELS = ("auto", "flex", "triton")
SUMMARY_KERNELS = ("auto", "triton", "torch")
FA4_MASKS = ("causal", "mask_mod")
SPLIT_DENSE_TAIL = ("cuda", "always", "never")
COMPILE_WHERE = ("cuda", "always", "never")


@dataclass(frozen=True)
class Options:
    """How flexwalk runs: kernels, CUDA graphs and compilation.  Defaults are the measured best."""

    prefill_kernel: str = "auto"
    """Kernel of a sparse prefill layer: "fa4" (FlashAttention 4's block-sparse kernel,
    kernels.fa4, where flash_attn.cute is installed), "triton" (kernels.triton_prefill: longest
    query blocks first, heads fastest), "flex" (compiled flex_attention on the BlockMask) or
    "auto": fa4 where `fa4_auto` and kernels.fa4.supported say (installed, Hopper, a measured
    shape: 1.40x the Triton kernel at 128K on an H100), else triton on CUDA for the shapes where
    it was measured faster than flex (prefill.TRITON_AUTO_SHAPES), flex elsewhere.  Where a
    kernel does not apply (fa4: padding, the residual; triton: soft-capping, gradients, inside a
    torch.compile trace) the next one runs whatever the setting: fa4, then triton, then flex."""
    fa4_auto: bool = True
    """Whether prefill_kernel="auto" takes FlashAttention 4 where it applies."""
    fa4_mask: str = "causal"
    """How FA4 masks the diagonal blocks: "causal" (its causal=True: its own row-limit mask and
    longest-first tile order) or "mask_mod" (causal=False with a CuTe mask function on the
    partial blocks only)."""
    fa4_shapes: frozenset | None = None
    """(head dim, query block, key block) shapes where FA4 runs; None: kernels.fa4.SHAPES, those
    measured faster than the other kernels."""
    triton_selection: bool = True
    """Prefill selection by flexwalk's Triton kernels (kernels.triton_selection) where they apply
    (CUDA, a sketched walk, at most 4096 blocks per row); False: the torch selection."""
    graph_selection: bool = True
    """Replay the prefill selection from a CUDA graph per length bucket (one launch instead of
    ~1 ms of host time per layer)."""
    compile_graphed_selection: bool = False
    """Capture the inductor-compiled torch selection in the graphs instead of the Triton or eager
    one (every new bucket first compiles for 7-72 s)."""
    graph_selection_max_tokens: int = 131072
    """Longest length bucket whose selection is graphed: a graph's private buffers grow with the
    square of the length."""
    selection_row_warps: int | None = None
    """Warps of the Triton selection's softmax and rank kernels (tuning); None: 4 up to 1024
    blocks per row, else 8."""
    split_dense_tail: str = "cuda"
    """Where flex prefill computes the dense tail with a dense kernel of its own (on a side
    stream on CUDA): "cuda" (on CUDA from split_dense_tail_min_tokens), "always" or "never"."""
    split_dense_tail_min_tokens: int = 16384
    """Shortest prompt whose dense tail is split off on CUDA (below, the launches cost more)."""
    summary_kernel: str = "auto"
    """Kernel of the residual's block summaries: "auto" (Triton on CUDA), "triton" (also CPU
    tensors, through triton's interpreter) or "torch"."""
    decode_kernel: str = "auto"
    """Kernel of a sparse decode step: "auto" (the split-KV Triton kernel on CUDA where it
    supports the shapes, flex elsewhere), "flex" or "triton" (CPU: triton's interpreter)."""
    decode_graphs: bool = True
    """With a fixed-size cache on CUDA, capture a layer's whole decode step in a CUDA graph after
    its first step and replay it."""
    triton_smem_limit: int | None = None
    """Shared memory (bytes per thread block) the Triton prefill kernel plans its tiles for;
    None: the device's opt-in limit (Hopper's under the interpreter)."""
    triton_selection_on_cpu: bool = False
    """Run the Triton selection on CPU tensors through triton's interpreter (tests)."""
    compile_selection: str = "cuda"
    """Where the torch prefill selection (no graph, no Triton) is compiled with a dynamic length:
    "cuda" (on CUDA: ~60 small kernels fused into a few; on CPU the eager ops are cheap and CPU
    inductor with dynamic shapes is fragile), "always" (CPU too: tests) or "never"."""
    compile_decode: str = "cuda"
    """Where a decode step's state update and selection (~40 small kernels) are compiled into a
    few fused ones: "cuda" (where launches dominate; on CPU compiling each shape costs seconds),
    "always" (CPU too: tests) or "never" (the eager reference)."""
    fa4_on_cpu: bool = False
    """Take FA4 as supported on CPU tensors, where a stand-in of flash_attn.cute runs (tests)."""

    def __post_init__(self) -> None:
        for name, allowed in (("prefill_kernel", PREFILL_KERNELS), ("decode_kernel", DECODE_KERNELS),
                              ("summary_kernel", SUMMARY_KERNELS), ("fa4_mask", FA4_MASKS),
                              ("split_dense_tail", SPLIT_DENSE_TAIL), ("compile_selection", COMPILE_WHERE),
                              ("compile_decode", COMPILE_WHERE)):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"allowed {', '.join(allowed)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                _fail(f.name, value, "allowed True, False")
        for name, lo in (("graph_selection_max_tokens", 0), ("split_dense_tail_min_tokens", 0)):
            _check_int(name, getattr(self, name), lo, optional=False)
        _check_int("selection_row_warps", self.selection_row_warps, 1, optional=True)
        _check_int("triton_smem_limit", self.triton_smem_limit, 1, optional=True)
        shapes = self.fa4_shapes
        if shapes is not None:
            ok = isinstance(shapes, (set, frozenset, list, tuple)) and all(
                isinstance(s, tuple) and len(s) == 3 and all(isinstance(x, int) for x in s) for s in shapes)
            if not ok:
                _fail("fa4_shapes", shapes, "allowed None or a set of (head dim, query block, key block) int triples")
            object.__setattr__(self, "fa4_shapes", frozenset(shapes))

    def replace(self, **changes: Any) -> "Options":
        """A copy with some fields changed (validated; an unknown field is a ValueError)."""
        check_fields(changes)
        return dataclasses.replace(self, **changes)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"flexwalk option {name}={value!r} is invalid: {allowed}")


def _check_int(name: str, value: Any, lo: int, *, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(name, value, f"allowed {'None or ' if optional else ''}an int >= {lo}")


FIELDS = tuple(f.name for f in dataclasses.fields(Options))
DEFAULT = Options()


def check_fields(fields: dict[str, Any]) -> None:
    """ValueError for a name that is not a field of Options (naming the fields allowed)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        name = unknown[0]
        raise ValueError(f"flexwalk option {name}={fields[name]!r} is unknown: allowed fields {', '.join(FIELDS)}")


def _freeze(fields: dict[str, Any]) -> tuple:
    """Fields as a hashable key (a set of shapes becomes a sorted tuple)."""
    return tuple(sorted((k, tuple(sorted(v)) if isinstance(v, (set, frozenset)) else v) for k, v in fields.items()))


@functools.lru_cache(maxsize=256)
def _resolved(key: tuple) -> Options:
    return Options(**{k: frozenset(v) if k == "fa4_shapes" and v is not None else v for k, v in key})


def resolve(*layers: dict[str, Any]) -> Options:
    """The Options of the defaults with each layer's fields applied in order (validated, cached)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    if not merged:
        return DEFAULT
    try:
        return _resolved(_freeze(merged))
    except ValueError:
        Options(**merged)  # raises again, naming the value as the caller gave it
        raise


_SCOPE: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("flexwalk_options", default={})


@contextlib.contextmanager
def options(**fields: Any) -> Iterator[Options]:
    """Set option fields for the code inside the `with` block (this thread or task); scopes nest,
    the inner one's fields over the outer's, and each restores what was before on exit.  Yields
    the options in force inside."""
    check_fields(fields)
    merged = {**_SCOPE.get(), **fields}
    effective = resolve(merged)  # validates the values before anything runs
    token = _SCOPE.set(merged)
    try:
        yield effective
    finally:
        _SCOPE.reset(token)


def set_options(**fields: Any) -> Options:
    """Set option fields for the rest of the current context, without a `with` block (scripts and
    benchmarks that switch kernels between measurements): in the main thread, until changed
    again; inside an `options(...)` scope, until that scope ends.  Returns the options in force."""
    check_fields(fields)
    merged = {**_SCOPE.get(), **fields}
    effective = resolve(merged)
    _SCOPE.set(merged)
    return effective


def scope_fields() -> dict[str, Any]:
    """The fields set by the `options(...)` scopes around this call."""
    return _SCOPE.get()


def current_options(model_fields: dict[str, Any] | None = None) -> Options:
    """The Options in force: the defaults, then `model_fields` (a model's `configure` fields),
    then the fields of the scopes around this call."""
    return resolve(model_fields or {}, _SCOPE.get())


class _ScopeModule(types.ModuleType):
    """This module, callable: `flexwalk.options(**fields)` is `options(**fields)`."""

    def __call__(self, **fields: Any):
        return options(**fields)


sys.modules[__name__].__class__ = _ScopeModule
