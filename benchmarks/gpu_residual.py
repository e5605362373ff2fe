"""GPU check and cost of the residual summaries (`SketchWalkConfig.residual`): one device call.

    PYTHONPATH=. python benchmarks/gpu_residual.py --out DIR [--sections check,cost] [--lengths 8192,32768,131072]
        [--variant '{"sketch_dim": 128}']

1. check: the Triton kernel with the residual against compiled flex with the residual (each its
   own implementation: the kernel's summary loop, flex's appended keys with mask_mod and
   score_mod) on the same selections, bf16, three layers with the walk carried, batch 2 with
   left padding: the Llama-3.1-8B shape at block 128 and Gemma 3's (4 / 1 heads, head dim 256)
   at block 64.  Max |difference| over real rows, finiteness, the residual counter.
2. cost: the whole layer (`sketchwalk_attention`, Triton kernel, 8B shape, block 128, 20%
   density, batch 1) with and without the residual (or the config fields of --variant), and
   cuDNN SDPA, in interleaved rounds; the per-round ratios and their medians.
Writes DIR/gpu_residual.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.nn.attention import SDPBackend

from flexwalk import SketchWalkConfig, sketchwalk_attention
from gpu_prefill import bench, block_spec, env_info, llama8b_qkv, log, run_sections, sdpa_ms  # this folder is on sys.path
from gpu_triton_prefill import outputs_by_kernel

RESULTS: dict = {}

CHECK_CASES = [("128", 32, 8, 128, 20000), ("128", 32, 8, 128, 5000), ("64", 4, 1, 256, 8000), ("64", 9, 3, 64, 6000)]


def check(cases=CHECK_CASES):
    rows = []
    for spec, hq, hkv, d, n in cases:
        g = torch.Generator(device="cuda").manual_seed(n + d)
        q, k, v = (torch.randn(2, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        kv = torch.ones(2, n, dtype=torch.bool, device="cuda")
        kv[1, : n // 3 + 5] = False
        cfg = SketchWalkConfig(**block_spec(spec), density=0.2, dense_layers=0, dense_below=0, residual=True)
        outs, counts = outputs_by_kernel(q, k, v, cfg, kv)
        real = kv[:, None, :, None]
        diff = max(float(((a.float() - b.float()).abs() * real).max()) for a, b in zip(outs["flex"], outs["triton"]))
        plain = SketchWalkConfig(**block_spec(spec), density=0.2, dense_layers=0, dense_below=0)
        base, _ = sketchwalk_attention(q, k, v, plain, 0, key_valid=kv)
        moved = float(((outs["triton"][0].float() - base.float()).abs() * real).max())
        r = dict(blocks=spec, hq=hq, hkv=hkv, d=d, n=n, max_abs_diff_triton_vs_flex=diff,
                 finite=all(bool(torch.isfinite(x).all()) for x in outs["triton"] + outs["flex"]),
                 counters_triton=counts["triton"], counters_flex=counts["flex"], change_vs_no_residual=moved)
        log(r)
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def cost(lengths, variant=None, n_rounds=5):
    """The whole layer with and without `variant` (config fields; default the residual), medians
    of per-round ratios against cuDNN and of variant / plain."""
    variant = {"residual": True} if variant is None else variant
    vname = ",".join(f"{k}={v}" for k, v in variant.items())
    rows = []
    base = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0)
    cfgs = {"plain": base, "variant": base.replace(**variant)}
    for n in lengths:
        long = n >= 65536
        q, k, v = llama8b_qkv(n)
        for c in cfgs.values():
            sketchwalk_attention(q, k, v, c, 0)
        r = dict(n=n, variant=vname, cudnn_ms=[], **{f"{x}_ms": [] for x in cfgs})
        for _ in range(n_rounds):
            r["cudnn_ms"].append(sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, long))
            for name, c in cfgs.items():
                r[f"{name}_ms"].append(bench(lambda: sketchwalk_attention(q, k, v, c, 0), long))
        for name in cfgs:
            ratios = sorted(a / b for a, b in zip(r["cudnn_ms"], r[f"{name}_ms"]))
            r[f"{name}_speedup_median"] = ratios[len(ratios) // 2]
        cost_ratio = sorted(b / a for a, b in zip(r["plain_ms"], r["variant_ms"]))
        r["variant_over_plain_median"] = cost_ratio[len(cost_ratio) // 2]
        log(f"{n}: plain x{r['plain_speedup_median']:.2f}, {vname} x{r['variant_speedup_median']:.2f}, "
            f"{vname} / plain {r['variant_over_plain_median']:.3f}; cudnn {min(r['cudnn_ms']):.3f} ms")
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="check,cost")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--variant", type=json.loads, default=None,
                    help='config fields the cost section compares with the plain layer (default {"residual": true})')
    args = ap.parse_args()
    RESULTS["env"] = env_info()
    log(RESULTS["env"])
    lengths = [int(x) for x in args.lengths.split(",") if x]
    sections = {"check": (check, ()), "cost": (cost, (lengths, args.variant))}
    run_sections([(name, *sections[name]) for name in args.sections.split(",")], RESULTS,
                 os.path.join(args.out, "gpu_residual.json"))


if __name__ == "__main__":
    main()
