"""The selection alone (which key blocks each query block keeps), benchmark group "selection n=N":

- torch: `flexwalk.sketchwalk_selection` and its flex BlockMask (the path of padding with holes,
  tensor parallelism and the oracle; the eager torch ops on the CPU);
- triton (CUDA only): the selection as a prefill layer runs it, flexwalk's Triton kernels
  replayed from a CUDA graph per length bucket, up to the block lists the attention kernels take.
"""

from __future__ import annotations

import pytest

import flexwalk
from benchmarks import workload
from benchmarks.conftest import SHAPE
from flexwalk import expected_density, selection_block_mask, sketchwalk_selection
from flexwalk.selection.driver import fused_selection


def test_torch(benchmark, qkv, length, config, device):
    q, k, _ = qkv
    benchmark.group = f"selection n={length}"
    benchmark.extra_info.update(shape=SHAPE.name, path="torch")

    def run():
        sel, _ = sketchwalk_selection(q, k, config, 0)
        return sel, selection_block_mask(sel)

    sel, bm = benchmark(workload.synchronized(run, device))
    assert abs(sel.density() - expected_density(config, length)) < 1e-6
    assert bm.kv_num_blocks.shape[-1] == -(-bm.seq_lengths[0] // config.q_block)


def test_triton(benchmark, qkv, length, config, device):
    if device != "cuda":
        pytest.skip("the Triton selection runs on CUDA (on the CPU only through triton's interpreter)")
    q, k, _ = qkv
    benchmark.group = f"selection n={length}"
    benchmark.extra_info.update(shape=SHAPE.name, path="triton")
    with flexwalk.options(triton_selection=True, graph_selection=True):
        fused_selection(q, k, config, 0, None)  # the graph's capture, outside the timing
        flexwalk.reset_counters()
        _, _, kept, causal = benchmark(workload.synchronized(lambda: fused_selection(q, k, config, 0, None), device))
    assert flexwalk.counters().get("triton_selection", 0) >= 1
    assert abs(float(kept.sum() / causal.sum()) - expected_density(config, length)) < 1e-6
