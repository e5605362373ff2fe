"""What the GPU tests share: inputs on the GPU, the oracle of a long prompt on sampled rows, and
counts of the kernels compiled so far."""

from __future__ import annotations

import torch

import flexwalk
from flexwalk import SketchWalkConfig, token_mask
from flexwalk.kernels import fa4, residual, triton_decode, triton_prefill, triton_selection
from flexwalk.reference import rows_error_budget, sample_rows

DEVICE = "cuda"


def block_fields(spec: str) -> dict:
    """'128' -> block_size 128; 'q128kv64' -> 128-row query blocks over 64-token key blocks."""
    if spec.startswith("q"):
        q, kv = spec[1:].split("kv")
        return {"block_size": int(kv), "query_block_size": int(q)}
    return {"block_size": int(spec)}


def sparse_config(spec: str = "128", **fields) -> SketchWalkConfig:
    """Every layer sparse at any length, 20% density unless given."""
    return SketchWalkConfig(**{"density": 0.2, "dense_layers": 0, "dense_below": 0, **block_fields(spec), **fields})


def inputs(batch: int, hq: int, hkv: int, n: int, d: int, *, pad: int = 0, seed: int = 0, dtype=torch.bfloat16):
    """Random q [B, hq, n, d], k, v [B, hkv, n, d] on the GPU, and the key validity (None without
    padding; with it, the last row's first `pad` tokens are left padding)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, d, device=DEVICE, generator=g).to(dtype) for h in (hq, hkv, hkv))
    if not pad:
        return q, k, v, None
    kv = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)
    kv[-1, :pad] = False
    return q, k, v, kv


def real_rows(n: int, pad: int = 0) -> torch.Tensor:
    """Query rows real in every batch row (past the padding), sampled (reference.sample_rows)."""
    return pad + sample_rows(n - pad, device=DEVICE)


def oracle_error(q, k, v, out, selection, key_valid, rows) -> tuple[float, float]:
    """(error, budget) of `out` against the eager oracle of `selection` on `rows`."""
    n = q.shape[2]
    return rows_error_budget(q, k, v, out, lambda r: token_mask(n, selection=selection, key_valid=key_valid, rows=r),
                             rows)


def dense_error(q, k, v, out, rows) -> tuple[float, float]:
    """(error, budget) of `out` against dense causal attention on `rows`."""
    n = q.shape[2]
    return rows_error_budget(q, k, v, out, lambda r: token_mask(n, batch=q.shape[0], rows=r, device=q.device), rows)


def prefill_counts() -> dict[str, int]:
    c = flexwalk.counters()
    return {name: c.get(name, 0) for name in ("sparse_prefill", "fa4_prefill", "triton_prefill", "residual",
                                              "dense_tail_split", "triton_selection")}


def triton_kernels_compiled() -> int:
    """Kernels Triton has compiled so far for flexwalk's JIT functions (every device)."""
    from triton.runtime.jit import JITFunction

    fns = []
    for module in (triton_prefill, triton_selection, triton_decode, residual):
        for value in vars(module).values():
            fns += [f for f in (value.values() if isinstance(value, dict) else [value]) if isinstance(f, JITFunction)]
    return sum(len(cache[0]) for f in fns for cache in f.device_caches.values())


def fa4_kernels_compiled() -> int:
    """Kernels FlashAttention 4 has compiled so far (0 where it is not installed)."""
    if not fa4.available():
        return 0
    from flash_attn.cute import interface

    cache = getattr(getattr(interface, "_flash_attn_fwd", None), "compile_cache", None)
    return len(getattr(cache, "cache", None) or ())
