"""pytest-benchmark: one attention layer, SketchWalk (selection + mask + sparse flex) vs SDPA.

CPU sizes so CI can run them as a smoke test (`make test` passes --benchmark-disable: each
runs once and its output is checked); `make bench` times them.  Compare ratios within one
run, never absolute times across machines.  The GPU benchmark lives in benchmarks/gpu_bench.py.
"""

import os
import pathlib

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flexwalk import SketchWalkConfig, sketchwalk_attention, sketchwalk_selection
from flexwalk.kernels.flex import selection_block_mask

SHAPE = dict(batch=1, hq=8, hkv=2, d=64)
LENGTHS = [1024, 2048]
CFG = SketchWalkConfig(block_size=64, density=0.2, dense_layers=0, dense_below=0)


def _qkv(n):
    g = torch.Generator().manual_seed(n)
    b, hq, hkv, d = SHAPE.values()
    return (torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g),
            torch.randn(b, hkv, n, d, generator=g))


@pytest.mark.parametrize("n", LENGTHS)
def test_sdpa_causal(benchmark, n):
    q, k, v = _qkv(n)
    benchmark.group = f"attention n={n}"
    out = benchmark(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    assert out.shape == q.shape


@pytest.mark.parametrize("n", LENGTHS)
def test_sketchwalk_total(benchmark, n):
    q, k, v = _qkv(n)
    sketchwalk_attention(q, k, v, CFG, 0)  # compile outside the timing
    benchmark.group = f"attention n={n}"
    out, _ = benchmark(lambda: sketchwalk_attention(q, k, v, CFG, 0))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.isfinite(out).all() and out.shape == ref.shape


@pytest.mark.parametrize("n", LENGTHS)
def test_selection_and_mask(benchmark, n):
    q, k, _ = _qkv(n)
    benchmark.group = f"selection n={n}"

    def run():
        sel, _ = sketchwalk_selection(q, k, CFG, 0)
        return sel, selection_block_mask(sel)

    sel, bm = benchmark(run)
    assert 0 < sel.density() < 0.6
