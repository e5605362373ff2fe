"""Observable fallbacks: per-path call counters, log-once messages and achieved density.

Counters are process-wide diagnostics (like torch._dynamo's counters), read with
`flexwalk.counters()` and cleared with `flexwalk.reset_counters()`.  Density records keep
the last selection of each layer as tensors, so recording never synchronises the host.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from typing import Any, Iterator

import torch

logger = logging.getLogger("flexwalk")

_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()
_logged: set[str] = set()
_density: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

# Path names, one per way a layer call can be served.
SPARSE_PREFILL = "sparse_prefill"  # SketchWalk selection + compiled flex (the product)
DENSE_LAYER = "dense_layer"  # layer_idx < dense_layers
DENSE_SHORT = "dense_short"  # prefill shorter than dense_below
SLIDING_WINDOW = "sliding_window"  # sliding-window layer: its own window, dense inside it
DENSE_DECODE = "dense_decode"  # decode step (skip_decode=True)
DENSE_CACHED_PREFILL = "dense_cached_prefill"  # several new tokens after a cached prefix
DENSE_PREFILL = "dense_prefill"  # prefill with skip_prefill=True (decode-only sparsity)
SPARSE_DECODE = "sparse_decode"  # decode step with the incremental SketchWalk state
DENSE_SHORT_ROWS = "dense_short_rows"  # rows of a padded batch shorter than dense_below: every causal block kept
DENSE_DECODE_SHORT = "dense_decode_short"  # decode step while the sequence is shorter than dense_below
DENSE_DECODE_SHORT_ROWS = "dense_decode_short_rows"  # sparse decode steps of padded rows shorter than dense_below: dense
DENSE_DECODE_FIRST = "dense_decode_first"  # the first decode_dense_steps steps after a prefill: dense
DENSE_DECODE_NO_STATE = "dense_decode_no_state"  # decode step without a usable state (see _REASONS)
DECODE_STATE_RESET = "decode_state_reset"  # a state was found stale (not continuing this sequence) and dropped
DECODE_GRAPH_STEPS = "decode_graph_steps"  # sparse decode steps replayed from a CUDA graph (static cache)
DECODE_STALE_STEPS = "decode_stale_steps"  # static-cache steps whose position disagreed with the state: dense
FA4_PREFILL = "fa4_prefill"  # of those sparse_prefill calls, the ones run by FlashAttention 4 (flexwalk.kernels.fa4)
TRITON_PREFILL = "triton_prefill"  # of those sparse_prefill calls, the ones run by flexwalk.kernels.triton_prefill's kernel
TRITON_SELECTION = "triton_selection"  # prefill selections computed by flexwalk.triton_selection (graph replays too)
RESIDUAL = "residual"  # of those sparse_prefill calls, the ones whose queries also attended the residual summaries
PADDING_HOLES = "padding_holes"  # sparse prefill with padding between real tokens: torch selection and flex
CUSTOM_MASK = "custom_mask"  # a 4D mask or a mask function other than causal: exact dense attention under it
PACKED_SEQUENCES = "packed_sequences"  # a row holding several documents: each selected and attended on its own
VARLEN_PREFILL = "varlen_prefill"  # a call of the varlen API (a packed batch of sequences, each counted on its own too)
DENSE_TAIL_SPLIT = "dense_tail_split"  # of the flex sparse_prefill calls, those whose dense tail ran as a call of its own
COMPILED_SELECTION = "compiled_selection"  # prefill selections by the inductor-compiled torch selection (no graph)
SELECTION_COMPILE_FAILED = "selection_compile_failed"  # inductor failed to compile the torch selection: it ran eager
TRITON_DECODE = "triton_decode"  # sparse decode steps attended by flexwalk's split-KV Triton kernel
SELECTION_GRAPH_CAPTURE = "selection_graph_capture"  # a CUDA graph of the prefill selection was captured (once per key)

_REASONS = {
    DENSE_LAYER: "layers below dense_layers run dense attention",
    DENSE_SHORT: "prefill shorter than dense_below runs dense attention",
    SLIDING_WINDOW: "sliding-window layers keep their window (dense inside it)",
    DENSE_DECODE: "decode steps run dense attention (skip_decode=True)",
    DENSE_CACHED_PREFILL: "a prefill continuing a cached prefix (chunked prefill) runs dense attention",
    DENSE_PREFILL: "prefill runs dense attention (skip_prefill=True: decode-only sparsity)",
    DENSE_SHORT_ROWS: (
        "rows of a padded batch with fewer real tokens than dense_below keep every causal block in the sparse "
        "layers (dense attention, as they would run alone); counted per row and layer"
    ),
    DENSE_DECODE_SHORT_ROWS: (
        "sparse decode steps of a padded batch's rows with fewer real tokens than dense_below attend every causal "
        "block (dense, as they would decode alone); counted per row, step and layer"
    ),
    DENSE_DECODE_FIRST: "the first decode_dense_steps decode steps after a prefill attend every causal block",
    DENSE_DECODE_SHORT: "decode steps of sequences shorter than dense_below run dense attention",
    DENSE_DECODE_NO_STATE: (
        "decode steps without a SketchWalk decode state run dense attention (the prefill did not run "
        "through sketchwalk_flex with sparse decode enabled, or the state was stale and dropped)"
    ),
    PADDING_HOLES: (
        "prefill with padding between real tokens (an attention mask with holes) runs the torch selection and "
        "flex, whose masks check each key; the Triton and FlashAttention 4 kernels take left/right padding only"
    ),
    CUSTOM_MASK: (
        "a 4D attention mask or a mask function other than (sliding-window) causal runs exact dense attention "
        "under that mask, as transformers' sdpa would"
    ),
    PACKED_SEQUENCES: "packed sequences (one row holding several documents): each document is selected and "
                      "attended on its own",
    DECODE_STATE_RESET: (
        "a decode state did not continue the current sequence (new cache, crop or reorder) and was dropped; "
        "decode stays dense until the next prefill"
    ),
}
_device_counts: dict[str, torch.Tensor] = {}


def count(path: str) -> None:
    with _lock:
        _counts[path] += 1
        first = path not in _logged and path in _REASONS
        if first:
            _logged.add(path)
    if first:
        logger.warning("flexwalk: %s (logged once; see flexwalk.counters())", _REASONS[path])


def log_once(key: str, message: str, *args) -> None:
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.warning(message, *args)


def device_counter(path: str, device: torch.device | str) -> torch.Tensor:
    """A 0-dim int64 counter on `device` that kernels add to in place (read by `counters()`)."""
    key = f"{path}@{device}"
    with _lock:
        t = _device_counts.get(key)
        if t is None:
            t = _device_counts[key] = torch.zeros((), dtype=torch.int64, device=device)
    return t


def counters() -> dict[str, int]:
    """Calls per attention path since the last reset, e.g. {'sparse_prefill': 28, ...}.

    Counters kept on the device (decode_stale_steps, dense_short_rows, dense_decode_short_rows) are read here: one host sync.
    """
    with _lock:
        out = dict(_counts)
        device = dict(_device_counts)
    for key, value in device.items():
        path = key.split("@")[0]
        n = int(value)
        if n:
            out[path] = out.get(path, 0) + n
            if path == DECODE_STALE_STEPS:
                log_once(path, "flexwalk: %d static-cache decode step(s) did not continue the decode state and ran "
                         "dense; call flexwalk.reset_decode_state(model) when reusing a cache", n)
            elif path in _REASONS:
                log_once(path, "flexwalk: %s (logged once; see flexwalk.counters())", _REASONS[path])
    return out


def record_density(layer_idx: int, kept: torch.Tensor, causal: torch.Tensor, phase: str = "prefill") -> None:
    with _lock:
        _density[(phase, layer_idx)] = (kept.detach(), causal.detach())


def density_report(phase: str = "prefill") -> dict[int, float]:
    """Achieved density of the last sparse selection of each layer (synchronises the host).

    phase: "prefill" (the last prefill's selection) or "decode" (the last decode step's row).
    """
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase={phase!r} is invalid: must be 'prefill' or 'decode'")
    with _lock:
        items = sorted((layer, v) for (ph, layer), v in _density.items() if ph == phase)
    return {layer: float(k.sum() / c.sum().clamp_min(1)) for layer, (k, c) in items}


_launch_logs: list[list[dict[str, Any]]] = []


@contextlib.contextmanager
def launch_log() -> Iterator[list[dict[str, Any]]]:
    """Log the launches of flexwalk's Triton prefill kernel made inside the block (tests, GPU
    checks): yields a list that gets one dict per launch, its launch parameters (tiles, warps,
    stages, ...), its "kernel" name and "shared", the compiled kernel's shared memory in bytes
    (None under triton's interpreter, or when the launch failed)."""
    log: list[dict[str, Any]] = []
    with _lock:
        _launch_logs.append(log)
    try:
        yield log
    finally:
        with _lock:
            _launch_logs.remove(log)


def log_launch(kernel: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The entry of a launch about to happen in every open `launch_log` (one dict, shared), or
    None when none is open (the usual case: nothing is kept)."""
    if not _launch_logs:
        return None
    entry = dict(params, kernel=kernel, shared=None)
    with _lock:
        for log in _launch_logs:
            log.append(entry)
    return entry


def forget_logged() -> None:
    """Forget which messages were logged once, so that each is logged again (tests of the logs)."""
    with _lock:
        _logged.clear()


def reset_counters() -> None:
    with _lock:
        _counts.clear()
        _density.clear()
        for t in _device_counts.values():
            t.zero_()
