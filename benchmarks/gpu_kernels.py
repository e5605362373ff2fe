"""GPU probe of the sparse prefill kernel and the host cost around it (issue 5): one device call.

    PYTHONPATH=. python benchmarks/gpu_kernels.py --out DIR [--sections options,autotune,host]

1. options: compiled flex with SketchWalk's own selection mask (block 128, 20% density,
   Llama-3.1-8B attention shape, bf16, batch 1) under flex's Triton kernel options: tile sizes,
   warps, stages, TMA, ROWS_GUARANTEED_SAFE, PRESCALE_QK; and the same kv tables with a plain
   causal mask_mod (what the selection-aware mask_mod costs on the partial blocks).  Swept at
   one length, the best few re-timed at the others; cuDNN SDPA in the same run.
2. autotune: flex compiled with mode="max-autotune-no-cudagraphs" at one length (what
   inductor's own search finds).
3. host: torch.profiler over calls of `sketchwalk_attention` at short lengths: host time per
   op, GPU time per kernel, wall per call; the answer to "where do the 0.4 ms go".
Writes DIR/gpu_kernels.json (+ DIR/host_N.txt profiler tables).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from flexwalk import SketchWalkConfig, sketchwalk_attention
from flexwalk.kernels.flex import compiled_flex
from flexwalk.selection.driver import fused_selection_mask
from flexwalk.kernels.flex import block_mask_from_indices
from gpu_prefill import bench, env_info, log  # this folder is on sys.path when run as a script

RESULTS: dict = {}
CFG = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0)

OPTIONS = {
    "default": {},
    "m128n64w8s2": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    "m128n64w8s4": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    "m128n64w4s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "m128n128w8s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "m64n64w4s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "m64n128w4s2": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    "tma": dict(USE_TMA=True),
    "safe_rows": dict(ROWS_GUARANTEED_SAFE=True),
    "prescale": dict(PRESCALE_QK=True),
    "tma_safe_prescale": dict(USE_TMA=True, ROWS_GUARANTEED_SAFE=True, PRESCALE_QK=True),
}


def _qkv(n, bsz=1):
    g = torch.Generator(device="cuda").manual_seed(n)
    mk = lambda h: torch.randn(bsz, h, n, 128, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    return mk(32), mk(8), mk(8)


def _sdpa_cudnn(q, k, v, long):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), long)


def _plain_causal(bm):
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return block_mask_from_indices(bm.kv_num_blocks[:, 0], bm.kv_indices[:, 0], bm.full_kv_num_blocks[:, 0],
                                   bm.full_kv_indices[:, 0], causal, 128, *bm.seq_lengths)


def options(sweep_n, other_ns, top):
    rows = []

    def run(n, names):
        long = n >= 65536
        q, k, v = _qkv(n)
        cudnn = _sdpa_cudnn(q, k, v, long)
        bm, _, kept, causal = fused_selection_mask(q, k, CFG, 0, None)
        achieved = float(kept.sum() / causal.sum())
        ref = compiled_flex(q, k, v, block_mask=bm, enable_gqa=True)
        for name in names:
            opts = OPTIONS[name]
            try:
                t0 = time.time()
                out = compiled_flex(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts or None)
                compile_s = time.time() - t0
                err = float((out.float() - ref.float()).abs().max())
                t = bench(lambda: compiled_flex(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts or None),
                          long)
                r = dict(n=n, option=name, ms=t, cudnn_ms=cudnn, ratio=cudnn / t, achieved=achieved,
                         max_diff_vs_default=err, first_call_s=compile_s)
            except Exception as e:  # an option this triton / GPU refuses
                r = dict(n=n, option=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(r)
            log(json.dumps(r))
        plain = _plain_causal(bm)
        t = bench(lambda: compiled_flex(q, k, v, block_mask=plain, enable_gqa=True), long)
        r = dict(n=n, option="default, plain causal mask_mod", ms=t, cudnn_ms=cudnn, ratio=cudnn / t,
                 achieved=achieved)
        rows.append(r)
        log(json.dumps(r))
        del q, k, v
        torch.cuda.empty_cache()

    run(sweep_n, list(OPTIONS))
    ok = sorted((r for r in rows if "ms" in r and r["option"] in OPTIONS), key=lambda r: r["ms"])
    best = [r["option"] for r in ok[:top]]
    if "default" not in best:
        best.append("default")
    for n in other_ns:
        run(n, best)
    return rows


def autotune(n):
    q, k, v = _qkv(n)
    bm, _, _, _ = fused_selection_mask(q, k, CFG, 0, None)
    fn = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    t0 = time.time()
    fn(q, k, v, block_mask=bm, enable_gqa=True)
    tune_s = time.time() - t0
    long = n >= 65536
    t = bench(lambda: fn(q, k, v, block_mask=bm, enable_gqa=True), long)
    t_def = bench(lambda: compiled_flex(q, k, v, block_mask=bm, enable_gqa=True), long)
    r = dict(n=n, autotuned_ms=t, default_ms=t_def, tune_s=tune_s)
    log(json.dumps(r))
    return r


def host(lengths, out_dir):
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for n in lengths:
        q, k, v = _qkv(n)
        for _ in range(3):
            sketchwalk_attention(q, k, v, CFG, 0)
        torch.cuda.synchronize()
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            sketchwalk_attention(q, k, v, CFG, 0)
        host_s = (time.perf_counter() - t0) / reps  # enqueue time (no sync inside)
        torch.cuda.synchronize()
        wall_s = (time.perf_counter() - t0) / reps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                sketchwalk_attention(q, k, v, CFG, 0)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ka) / reps
        table_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=40)
        table_gpu = ka.table(sort_by="self_device_time_total", row_limit=25)
        with open(os.path.join(out_dir, f"host_{n}.txt"), "w") as f:
            f.write(table_cpu + "\n\n" + table_gpu)
        r = dict(n=n, enqueue_ms=host_s * 1e3, wall_ms=wall_s * 1e3, gpu_ms=gpu_us / 1e3)
        rows.append(r)
        log(json.dumps(r))
        log(table_cpu[:6000])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="host,options,autotune")
    ap.add_argument("--sweep-n", type=int, default=32768)
    ap.add_argument("--other-n", default="8192,131072")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--host-n", default="8192,32768")
    ap.add_argument("--autotune-n", type=int, default=32768)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS["env"] = env_info()
    try:
        import flash_attn.cute  # noqa: F401  flex's BACKEND="FLASH" needs it

        RESULTS["env"]["flash_attn_cute"] = True
    except Exception as e:
        RESULTS["env"]["flash_attn_cute"] = f"{type(e).__name__}: {e}"
    log(RESULTS["env"])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    sections = {"host": (host, (ints(args.host_n), args.out)),
                "options": (options, (args.sweep_n, ints(args.other_n), args.top)),
                "autotune": (autotune, (args.autotune_n,))}
    for name in args.sections.split(","):
        fn, a = sections[name]
        t = time.time()
        try:
            RESULTS[name] = fn(*a)
        except Exception as e:
            traceback.print_exc()
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
        log(f"({name}: {time.time() - t:.0f} s)")
        with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
