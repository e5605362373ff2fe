"""One prefill attention layer: dense SDPA (cuDNN on CUDA) against SketchWalk with each prefill
kernel, at the same shape and length (benchmark group "prefill n=N").

The sparse layer is `flexwalk.sketchwalk_attention` as a user calls it: the selection, its block
lists and the block-sparse attention.  Before it is timed, its output is checked against the eager
oracle on its own selection and at full budget against dense attention (`workload.check_layer`).
"""

from __future__ import annotations

import torch

from benchmarks import workload
from benchmarks.conftest import SHAPE
from flexwalk import expected_density, sketchwalk_attention


def test_dense(benchmark, qkv, length, device):
    q, k, v = qkv
    benchmark.group = f"prefill n={length}"
    benchmark.extra_info.update(shape=SHAPE.name, baseline=workload.dense_backend(device))
    out = benchmark(workload.synchronized(lambda: workload.dense_attention(q, k, v), device))
    assert out.shape == q.shape and bool(torch.isfinite(out).all())


def test_sparse(benchmark, qkv, length, config, kernel, device):
    q, k, v = qkv
    check = workload.check_layer(q, k, v, config)
    assert check["ok"], check
    if kernel in ("triton", "fa4"):  # the kernel asked for is the one that ran (where it applies)
        assert check["kernel"] == kernel, check
    # the kept share is the budget rule's (plus the forced and tail blocks), and sparse
    assert abs(check["density"] - expected_density(config, length)) < 1e-6 and check["density"] < 0.6, check
    benchmark.group = f"prefill n={length}"
    benchmark.extra_info.update(shape=SHAPE.name, kernel=check["kernel"], density=check["density"])
    out, _ = benchmark(workload.synchronized(lambda: sketchwalk_attention(q, k, v, config, 0), device))
    assert out.shape == q.shape
