"""The selection's host side on a GPU: where a `fused_selection` call spends its CPU time.

One layer's selection on the Llama-3.1-8B attention shape (bf16, 32 / 8 heads, head dim 128,
block 128, density 0.2, batch 1): `do_bench` of a first layer and of a layer with the walk, the
host time per call with the GPU kept busy by a sleep queued first, the host time of the graph's
pieces (`fill`: the one block_parts launch; `replay`; `kept_outputs`: the one copy of the walk
and density sums), and a cProfile of 300 calls of each.  Host times of many calls queued behind
a sleep include waits for room in the launch queue, so they are upper bounds.  (Session 24's
docs/data/session24/host_diag.log timed 200 calls per value; gpu_selection_profile.host_us times 50.)

    PYTHONPATH=. python benchmarks/gpu_selection_host.py [LENGTH]   (default 32768; prints only)
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys

import torch

import flexwalk
from triton.testing import do_bench

from flexwalk.kernels import flex as flexwalk_flex
from flexwalk.selection import driver
from flexwalk import SketchWalkConfig
from flexwalk.selection.driver import fused_selection
from flexwalk.selection.sketch import sketch_matrix
from gpu_selection_profile import host_us  # this folder is on sys.path as a script


def main():
    cfg = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    _, st, _, _ = fused_selection(q, k, cfg, 0, None)
    fused_selection(q, k, cfg, 1, st)
    first = lambda: fused_selection(q, k, cfg, 0, None)  # noqa: E731
    walk = lambda: fused_selection(q, k, cfg, 1, st)  # noqa: E731
    for _ in range(2):
        print("do_bench first", do_bench(first), "walk", do_bench(walk), flush=True)
    for _ in range(2):
        print("host first", host_us(first), "walk", host_us(walk), flush=True)
    print("graphs", [(key[-1], key[7]) for key in driver._SELECTION_GRAPHS])
    p = sketch_matrix(cfg, 1, 128, q.device)
    for g in list(driver._SELECTION_GRAPHS.values()):
        prev = st.transition if g.prev is not None else None
        print("has_prev", prev is not None, "fill", host_us(lambda: g.fill(q, k, p, prev, None)),
              "replay", host_us(lambda: g.graph.replay()), "kept_outputs", host_us(lambda: g.kept_outputs()), flush=True)
    print("sketch_matrix", host_us(lambda: sketch_matrix(cfg, 1, 128, q.device)))
    print("bucket", host_us(lambda: flexwalk_flex.bucket_length(n)))
    print("graphable", host_us(lambda: driver._graphable(q, cfg, flexwalk_flex.bucket_length(n), flexwalk.current_options())))
    for name, fn in (("first", first), ("walk", walk)):
        torch.cuda.synchronize()
        torch.cuda._sleep(3_000_000_000)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(300):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print(name, s.getvalue()[:5000], flush=True)


if __name__ == "__main__":
    main()
