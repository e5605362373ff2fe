"""One decode step of one layer over a cache of N tokens: dense SDPA of the new query against
every cached key, against `flexwalk.sketchwalk_decode` (the decode state's update, its selection
and the sparse attention: the split-KV Triton kernel on CUDA, flex with a one-row BlockMask on the
CPU; replayed from a CUDA graph on CUDA, as a static cache runs it), benchmark group "decode n=N".

The state is built from a prefill of N - 64 tokens; each timed step absorbs the next token of
the cache, so the rounds stay below 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import flexwalk
from benchmarks import workload
from benchmarks.conftest import SHAPE
from flexwalk import DecodeState, sketchwalk_decode
from flexwalk.reference import reference_error_budget

AHEAD = 64  # cache slots past the prefill: the steps taken
ROUNDS = 40
LAYER = 2  # a layer past the first (its own walk starts at this layer's prefill)


def _state(q, k, config, n):
    return DecodeState.from_prefill(q[:, :, : n - AHEAD], k[:, :, : n - AHEAD], config, LAYER, kv_tokens=n,
                                    growable=False)


def test_dense(benchmark, qkv, length, device):
    q, k, v = qkv
    t = length - AHEAD
    qt, kt, vt = q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1]
    benchmark.group = f"decode n={length}"
    benchmark.extra_info.update(shape=SHAPE.name)
    out = benchmark(workload.synchronized(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), device))
    assert out.shape == qt.shape and bool(torch.isfinite(out).all())


def test_sparse(benchmark, qkv, length, config, device):
    q, k, v = qkv
    t = length - AHEAD
    # full budget first: the step attends every cached key, as dense attention does
    full = _state(q, k, config.replace(density=1.0), length)
    out, _ = sketchwalk_decode(q[:, :, t : t + 1], k, v, full)
    every = torch.ones(q.shape[0], 1, 1, t + 1, dtype=torch.bool, device=q.device)
    err, budget = reference_error_budget(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], every, out)
    assert err <= budget, (err, budget)

    state = _state(q, k, config.replace(decode_dense_steps=0), length)  # every timed step selects
    step = workload.synchronized(lambda: sketchwalk_decode(q[:, :, state.length : state.length + 1], k, v, state),
                                 device)
    benchmark.group = f"decode n={length}"
    benchmark.extra_info.update(shape=SHAPE.name)
    flexwalk.reset_counters()
    out, _ = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    density = flexwalk.density_report("decode")[LAYER]
    benchmark.extra_info.update(density=density)
    assert bool(torch.isfinite(out).all())
    assert 0 < density < 0.6, density  # the step attends a share of the cache's blocks
    assert flexwalk.counters().get("decode_stale_steps", 0) == 0
