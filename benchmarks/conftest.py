"""The benchmark grid, in one place: the device, the attention shape and the lengths, densities
and kernels each test is parametrised by.

On a CUDA GPU: the Llama-3.1-8B attention shape (32 / 8 heads, head dim 128, bf16) at 8K and
32K tokens, 128-token blocks, every prefill kernel (`workload.kernels_for`).  On the CPU: a small
shape (8 / 2 heads, head dim 64, float32) at 1K and 2K tokens, 64-token blocks, so that
`make test` runs each benchmark once as a test (--benchmark-disable) and `make bench` times them.
Compare ratios within one run (dense and sparse share a group), never absolute times across
machines.  `make bench-gpu` (report.py) is the GPU measurement the docs quote.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

import flexwalk  # noqa: E402
from benchmarks import workload  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = workload.shape_for(DEVICE)
LENGTHS = [8192, 32768] if DEVICE == "cuda" else [1024, 2048]
BLOCK_SIZE = 128 if DEVICE == "cuda" else 64
DENSITIES = [0.2]
KERNELS = workload.kernels_for(DEVICE)


@pytest.fixture(autouse=True)
def _fresh_counters():
    flexwalk.reset_counters()
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module", params=LENGTHS, ids=lambda n: f"n{n}")
def length(request):
    return request.param


@pytest.fixture(params=DENSITIES, ids=lambda d: f"density{d}")
def density(request):
    return request.param


@pytest.fixture(params=KERNELS)
def kernel(request):
    """A prefill kernel (flexwalk.Options.prefill_kernel), in force for the test."""
    with flexwalk.options(prefill_kernel=request.param):
        yield request.param


@pytest.fixture
def config(density):
    return workload.layer_config(BLOCK_SIZE, density)


@pytest.fixture(scope="module")
def qkv(length):
    """q, k, v of SHAPE at `length` tokens on DEVICE, batch 1 (built once per module and length)."""
    return workload.qkv(SHAPE, length, device=DEVICE)
