"""Observable fallbacks: per-path call counters, log-once messages and achieved density.

Counters are process-wide diagnostics (like torch._dynamo's counters), read with
`flexwalk.counters()` and cleared with `flexwalk.reset_counters()`.  Density records keep
the last selection of each layer as tensors, so recording never synchronises the host.
"""

from __future__ import annotations

import collections
import logging
import threading

import torch

logger = logging.getLogger("flexwalk")

_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()
_logged: set[str] = set()
_density: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

# Path names, one per way a layer call can be served.
SPARSE_PREFILL = "sparse_prefill"  # SketchWalk selection + compiled flex (the product)
DENSE_LAYER = "dense_layer"  # layer_idx < dense_layers
DENSE_SHORT = "dense_short"  # prefill shorter than dense_below
SLIDING_WINDOW = "sliding_window"  # sliding-window layer: its own window, dense inside it
DENSE_DECODE = "dense_decode"  # decode step (skip_decode=True)
DENSE_CACHED_PREFILL = "dense_cached_prefill"  # several new tokens after a cached prefix

_REASONS = {
    DENSE_LAYER: "layers below dense_layers run dense attention",
    DENSE_SHORT: "prefill shorter than dense_below runs dense attention",
    SLIDING_WINDOW: "sliding-window layers keep their window (dense inside it)",
    DENSE_DECODE: "decode steps run dense attention (skip_decode=True)",
    DENSE_CACHED_PREFILL: "a prefill continuing a cached prefix (chunked prefill) runs dense attention",
}


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


def counters() -> dict[str, int]:
    """Calls per attention path since the last reset, e.g. {'sparse_prefill': 28, ...}."""
    with _lock:
        return dict(_counts)


def record_density(layer_idx: int, kept: torch.Tensor, causal: torch.Tensor) -> None:
    with _lock:
        _density[layer_idx] = (kept.detach(), causal.detach())


def density_report() -> dict[int, float]:
    """Achieved density of the last sparse selection of each layer (synchronises the host)."""
    with _lock:
        items = sorted(_density.items())
    return {layer: float(k.sum() / c.sum().clamp_min(1)) for layer, (k, c) in items}


def reset_counters() -> None:
    with _lock:
        _counts.clear()
        _density.clear()
