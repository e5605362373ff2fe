"""Where the selection's time goes on a GPU (issue 5: selection + mask at most 5% of the layer from 32K).

One layer's `fused_selection` on the Llama-3.1-8B attention shape (bf16, 32 / 8 heads, head dim 128,
block 128, density 0.2), with the walk carried from a previous layer and as a first layer, per length
and batch:

- `do_bench` medians of the whole selection (the CUDA-graph path, as the layer runs it), of the
  Triton path without a graph, of reading q and k once (`q.sum(), k.sum()`: the selection's memory
  floor), of the fp32 head means of q and k by torch.mean (what the graph was fed before session
  23), and of `triton_selection.block_parts` (the one pass over q and k that feeds the graph now);
- the host time of one selection call (calls queued behind a long GPU sleep, so the clock
  measures Python and launches only);
- a torch.profiler table of the CUDA kernels of both paths (time per call, by kernel);
- `--sweep`: block_parts' heads per program, tokens per load and warps, each timed at every
  length and batch (the shipped values are triton_selection.PARTS_*);
- `--row-warps 1,2,4,8`: the softmax and rank kernels' warps (one row of blocks per program),
  each setting with fresh CUDA graphs: the whole selection (first layer and with the walk) and
  those two kernels' times (the shipped rule is triton_selection.row_warps).

    PYTHONPATH=. python benchmarks/gpu_selection_profile.py --out DIR [--lengths 32768,131072]
        [--batches 1,4] [--sweep] [--row-warps 1,2,4,8]

Writes DIR/gpu_selection_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import time

import torch

import flexwalk
from triton.testing import do_bench

from flexwalk.kernels import flex as flexwalk_flex
from flexwalk import SketchWalkConfig, triton_selection
from flexwalk.selection.driver import fused_selection

SWEEP = dict(heads=(1, 2, 4), tokens=(32, 64), warps=(4, 8))


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


def host_us(fn, reps: int = 50) -> float:
    """Host time per call (µs), the GPU kept busy by a sleep queued first so no call waits on it."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time ahead of the calls
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return t


def parts_fn(q, k, nb, **parts):
    return lambda: triton_selection.block_parts(q, k, None, 128, nb, **parts)


def sweep(q, k, nb) -> dict:
    out = {}
    for h, t, w in itertools.product(SWEEP["heads"], SWEEP["tokens"], SWEEP["warps"]):
        out[f"heads{h}_tokens{t}_warps{w}"] = do_bench(parts_fn(q, k, nb, heads=h, tokens=t, warps=w))
    return out


def row_warps(q, k, state, cfg, settings) -> dict:
    out = {}
    try:
        for w in settings:
            flexwalk.options.set_options(selection_row_warps=w)  # graphs are captured per warps setting
            first = lambda: fused_selection(q, k, cfg, 0, None)  # noqa: E731
            walk = lambda: fused_selection(q, k, cfg, 1, state)  # noqa: E731
            ks = kernels(walk)
            out[f"warps{w}"] = dict(first_layer_ms=do_bench(first), walk_ms=do_bench(walk),
                                    rank_us=ks.get("_rank_kernel"), softmax_us=ks.get("_softmax_kernel"))
            print("row warps", w, out[f"warps{w}"], flush=True)
    finally:
        flexwalk.options.set_options(selection_row_warps=None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--row-warps", default="")
    args = ap.parse_args()
    cfg = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "parts": dict(heads=triton_selection.PARTS_HEADS, tokens=triton_selection.PARTS_TOKENS,
                         warps=triton_selection.PARTS_WARPS)}
    for bsz, n in itertools.product((int(x) for x in args.batches.split(",")),
                                    [int(x) for x in args.lengths.split(",")]):
        q = torch.randn(bsz, 32, n, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(bsz, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        nb = flexwalk_flex.bucket_length(n) // 128
        _, state, _, _ = fused_selection(q, k, cfg, 0, None)
        row = {"q_plus_k_bytes": (q.numel() + k.numel()) * 2}
        row["read_q_k_once_ms"] = do_bench(lambda: (q.sum(), k.sum()))
        row["head_means_ms"] = do_bench(lambda: (torch.mean(q, 1, dtype=torch.float32),
                                                 torch.mean(k, 1, dtype=torch.float32)))
        row["block_parts_ms"] = do_bench(parts_fn(q, k, nb))
        row["block_parts_tb_s"] = row["q_plus_k_bytes"] / row["block_parts_ms"] / 1e9
        if args.sweep:
            row["block_parts_sweep_ms"] = sweep(q, k, nb)
        # the graph with the walk (layers after the first), the graph of a first layer (no walk:
        # what gpu_prefill's select_mask_ms times), and the Triton path without a graph
        for tag, graph, prev in (("graph", True, state), ("graph_first_layer", True, None), ("no_graph", False, state)):
            old = flexwalk.current_options().graph_selection
            flexwalk.options.set_options(graph_selection=graph)
            try:
                fn = lambda: fused_selection(q, k, cfg, 1 if prev is not None else 0, prev)  # noqa: E731
                row[f"selection_{tag}_ms"] = do_bench(fn)
                row[f"selection_{tag}_host_us"] = host_us(fn)
                row[f"kernels_{tag}_us"] = kernels(fn)
            finally:
                flexwalk.options.set_options(graph_selection=old)
        if args.row_warps:
            row["row_warps"] = row_warps(q, k, state, cfg, [int(x) for x in args.row_warps.split(",")])
        res[f"B{bsz}_{n}"] = row
        print(bsz, n, json.dumps(row, indent=1), flush=True)
        del q, k
        torch.cuda.empty_cache()
    if args.sweep:  # the setting least behind each cell's fastest, summed over the cells
        sweeps = [r["block_parts_sweep_ms"] for key, r in res.items() if key.startswith("B")]
        best = min(sweeps[0], key=lambda c: sum(s[c] / min(s.values()) for s in sweeps))
        res["sweep_best"] = best
        print("sweep best", best, ",".join(x.lstrip("headstokenswarps") for x in best.split("_")), flush=True)
    with open(os.path.join(args.out, "gpu_selection_profile.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
