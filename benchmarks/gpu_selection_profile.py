"""Where the selection's time goes on a GPU (issue 5: selection + mask at most 5% of the layer from 32K).

One layer's `fused_selection` on the Llama-3.1-8B attention shape (bf16, 32 / 8 heads, head dim 128,
block 128, density 0.2, batch 1), with the walk carried from a previous layer:

- `do_bench` medians of the whole selection (the CUDA-graph path, as the layer runs it), of the
  Triton path without a graph, and of its first step alone, the fp32 head means of q and k (which
  read all of q and k: the selection's memory floor);
- a torch.profiler table of the CUDA kernels of both paths (time per call, by kernel).

    PYTHONPATH=. python benchmarks/gpu_selection_profile.py --out DIR [--lengths 32768,131072]

Writes DIR/gpu_selection_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch
from triton.testing import do_bench

import flexwalk.attention as attention
from flexwalk import SketchWalkConfig
from flexwalk.attention import fused_selection


def kernels(fn, reps: int = 20) -> dict:
    """Mean CUDA time per call (µs) of each kernel `fn` launches, from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name[:90]] += e.device_time / reps
    return {k: round(v, 2) for k, v in out.most_common()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--lengths", default="8192,32768,131072")
    args = ap.parse_args()
    cfg = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for n in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        _, state, _, _ = fused_selection(q, k, cfg, 0, None)
        row = {"q_plus_k_bytes": (q.numel() + k.numel()) * 2}
        row["head_means_ms"] = do_bench(lambda: (torch.mean(q, 1, dtype=torch.float32),
                                                 torch.mean(k, 1, dtype=torch.float32)))
        row["read_q_k_once_ms"] = do_bench(lambda: (q.sum(), k.sum()))
        for tag, graph in (("graph", True), ("no_graph", False)):
            old = attention.GRAPH_SELECTION
            attention.GRAPH_SELECTION = graph
            try:
                fn = lambda: fused_selection(q, k, cfg, 1, state)  # noqa: E731
                row[f"selection_{tag}_ms"] = do_bench(fn)
                row[f"kernels_{tag}_us"] = kernels(fn)
            finally:
                attention.GRAPH_SELECTION = old
        res[n] = row
        print(n, json.dumps(row, indent=1), flush=True)
        del q, k
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gpu_selection_profile.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
