"""GPU check and benchmark of the Triton selection (flexwalk.kernels.triton_selection, issue 5): one device call.

    PYTHONPATH=. python benchmarks/gpu_triton_selection.py --out DIR [--sections check,compiles,rounds,per_head]
        [--lengths 8192,16384,32768,65536,131072]

1. check: the selection's tables from the Triton kernels against the torch selection, both captured
   in the CUDA graph (flexwalk.options.Options.triton_selection on / off), on the same bf16 inputs: three
   layers with the walk carried, batch 2 with left padding (and batch 1 without: the graph
   holds no validity then), blocks 128, 64 and q128kv64, lengths
   off the bucket grid, and 200K tokens (above GRAPH_SELECTION_MAX_TOKENS: the Triton selection
   without a graph against the inductor-compiled one).  Rows whose tables differ (a tie at the
   budget's edge), walk max |difference|, and the layer outputs' max |difference|.
2. compiles: ten prompt lengths, 8K-128K, through one layer: first-call time per length, graph
   captures, and the Triton kernels' compiled variants (they must not grow per length).
3. rounds: the whole layer (`sketchwalk_attention`: selection + tables + attention, the issue's
   "total") on the Llama-3.1-8B attention shape (bf16, 20% density, block 128, batch 1) with the
   Triton selection and with the torch one captured in the graph (the previous default), each
   with the shipped kernel, and cuDNN SDPA, timed in 7 interleaved rounds: per-round ratios and
   their median.  Also the selection alone (`fused_selection`, tables without a BlockMask), and its
   share of the total.
4. per_head: head_scoring="per_head" (no CUDA graph), the Triton selection against the
   inductor-compiled one: time per call at batch 1, and the first call of each new batch shape.
Writes DIR/gpu_triton_selection.json.  Medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.nn.attention import SDPBackend

import flexwalk
from flexwalk import SketchWalkConfig, sketchwalk_attention
from flexwalk.kernels import triton_selection
from flexwalk.selection.driver import fused_selection
from gpu_prefill import bench, block_spec, env_info, llama8b_qkv, log, run_sections, sdpa_ms  # this folder is on sys.path as a script

RESULTS: dict = {}
CHECK_CASES = [("128", 32, 8, 128, 30000, "mean-unpadded"), ("64", 9, 3, 64, 20000, "mean-unpadded"),
               ("128", 32, 8, 128, 8000, "mean"), ("128", 32, 8, 128, 30000, "mean"), ("64", 9, 3, 64, 20000, "mean"),
               ("q128kv64", 32, 8, 128, 20000, "mean"), ("128", 32, 8, 128, 200000, "mean"),
               ("64", 4, 1, 256, 5000, "mean"), ("128", 32, 8, 128, 20000, "per_head"), ("64", 4, 1, 256, 5000, "per_head")]


def _tables(q, k, cfg, kv, triton: bool):
    flexwalk.options.set_options(triton_selection=triton)
    st, outs = None, []
    for layer in range(3):
        tables, st, kept, causal = fused_selection(q, k, cfg, layer, st, key_valid=kv)
        outs.append(([t.clone() for t in tables], st.transition.clone(), kept.clone(), causal.clone()))
        q, k = q.roll(4099, 2), k.roll(4099, 2)  # other layers' inputs
    flexwalk.options.set_options(triton_selection=True)
    return outs


def check(cases=CHECK_CASES):
    rows = []
    for spec, hq, hkv, d, n, scoring in cases:
        g = torch.Generator(device="cuda").manual_seed(n + d)
        unpadded = scoring.endswith("-unpadded")  # batch 1, no validity: the graph without bounds
        scoring = scoring.removesuffix("-unpadded")
        bsz = 1 if n > 131072 or unpadded else 2
        q, k, v = (torch.randn(bsz, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        kv = None
        if bsz == 2:
            kv = torch.ones(2, n, dtype=torch.bool, device="cuda")
            kv[1, : n // 3] = False
        cfg = SketchWalkConfig(**block_spec(spec), density=0.2, dense_layers=0, dense_below=0, dense_tail_blocks=2,
                               head_scoring=scoring)
        flexwalk.reset_counters()
        got = _tables(q, k, cfg, kv, True)
        ref = _tables(q, k, cfg, kv, False)
        r = dict(blocks=spec, scoring=scoring, padded=kv is not None, hq=hq, hkv=hkv, d=d, n=n, batch=bsz, triton_selections=flexwalk.counters().get(
            "triton_selection", 0), layers=[])
        for (tg, wg, kg, cg), (tr, wr, kr, cr) in zip(got, ref):
            table_g, table_r = tg[4], tr[4]
            nb = wr.shape[-1]
            differ = (table_g != table_r).any(-1)
            same = ~differ
            lists_equal = all(bool((a[same] == b[same]).all()) for a, b in zip(tg[:4], tr[:4]) if a.dim() == 3)
            r["layers"].append(dict(
                rows=int(table_r.shape[0] * table_r.shape[1]), rows_differ=int(differ.sum()),
                lists_equal_elsewhere=lists_equal, bounds_equal=bool((tg[5] == tr[5]).all() and (tg[6] == tr[6]).all()),
                walk_max_abs_diff=float((wg[:, :nb, :nb] - wr).abs().max()),
                kept=float(kg.sum()), kept_torch=float(kr.sum()), causal_equal=bool((cg == cr).all())))
        outs = {}
        for tri in (True, False):
            flexwalk.options.set_options(triton_selection=tri)
            st, o = None, []
            for layer in range(3):
                out, st = sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=kv)
                o.append(out)
            outs[tri] = o
        flexwalk.options.set_options(triton_selection=True)
        r["out_max_abs_diff"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs[True], outs[False]))
        r["finite"] = all(bool(torch.isfinite(o).all()) for o in outs[True])
        log(r)
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _variants():
    fns = [triton_selection._bounds_kernel, triton_selection._parts_kernel, triton_selection._sketch_kernel, triton_selection._softmax_kernel,
           triton_selection._rank_kernel]
    total = 0
    for f in fns:
        cache = getattr(f, "device_caches", None) or getattr(f, "cache", None) or {}
        for v in cache.values():
            total += len(v[0]) if isinstance(v, tuple) else len(v)
    return total


def compiles(lengths):
    """Ten lengths through one layer: first-call seconds, graph captures, Triton kernel variants."""
    cfg = SketchWalkConfig(**block_spec("128"), density=0.2, dense_layers=0, dense_below=0)
    rows = []
    for n in lengths:
        q, k, v = llama8b_qkv(n, "cuda")
        flexwalk.reset_counters()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sketchwalk_attention(q, k, v, cfg, 0)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        sketchwalk_attention(q, k, v, cfg, 0)
        torch.cuda.synchronize()
        second = time.perf_counter() - t0
        c = flexwalk.counters()
        r = dict(n=n, first_call_s=first, second_call_s=second, captures=c.get("selection_graph_capture", 0),
                 triton_selection=c.get("triton_selection", 0), triton_variants=_variants())
        log(r)
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def rounds(lengths, n_rounds=7):
    cfg = SketchWalkConfig(**block_spec("128"), density=0.2, dense_layers=0, dense_below=0)
    rows = []
    for n in lengths:
        long = n >= 65536
        q, k, v = llama8b_qkv(n, "cuda")
        kinds = {"triton_sel": True, "torch_sel": False}
        for tri in kinds.values():  # capture outside the rounds
            flexwalk.options.set_options(triton_selection=tri)
            sketchwalk_attention(q, k, v, cfg, 0)
        r = dict(n=n, cudnn_ms=[], **{f"{kd}_ms": [] for kd in kinds}, **{f"{kd}_select_ms": [] for kd in kinds})
        for _ in range(n_rounds):
            r["cudnn_ms"].append(sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, long))
            for kd, tri in kinds.items():
                flexwalk.options.set_options(triton_selection=tri)
                r[f"{kd}_ms"].append(bench(lambda: sketchwalk_attention(q, k, v, cfg, 0), long))
                r[f"{kd}_select_ms"].append(bench(lambda: fused_selection(q, k, cfg, 0, None), long))
        flexwalk.options.set_options(triton_selection=True)
        for kd in kinds:
            ratios = sorted(c / t for c, t in zip(r["cudnn_ms"], r[f"{kd}_ms"]))
            r[f"{kd}_speedup_per_round"] = ratios
            r[f"{kd}_speedup_median"] = ratios[len(ratios) // 2]
            med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            r[f"{kd}_select_share"] = med(r[f"{kd}_select_ms"]) / med(r[f"{kd}_ms"])
        log(f"{n}: triton_sel x{r['triton_sel_speedup_median']:.2f} "
            f"({', '.join(f'{x:.2f}' for x in r['triton_sel_speedup_per_round'])}), select share "
            f"{r['triton_sel_select_share']:.1%}; torch_sel x{r['torch_sel_speedup_median']:.2f}, select share "
            f"{r['torch_sel_select_share']:.1%}; cudnn {', '.join(f'{x:.2f}' for x in r['cudnn_ms'])} ms")
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def per_head(lengths):
    """head_scoring="per_head" (no graph): the Triton selection against the inductor-compiled one,
    time per call and first-call seconds for new batch shapes (batch 1, 2, 2 with padding)."""
    rows = []
    cfg = SketchWalkConfig(**block_spec("128"), density=0.2, dense_layers=0, dense_below=0, head_scoring="per_head")
    for n in lengths:
        long = n >= 65536
        for tri in (True, False):
            flexwalk.options.set_options(triton_selection=tri)
            r = dict(n=n, selection="triton" if tri else "inductor", first_calls_s=[])
            for bsz, pad in ((1, False), (2, False), (2, True)):
                q, k, v = llama8b_qkv(n, "cuda", batch=bsz)
                kv = None
                if pad:
                    kv = torch.ones(bsz, n, dtype=torch.bool, device="cuda")
                    kv[1, : n // 5] = False
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fused_selection(q, k, cfg, 0, None, key_valid=kv)
                torch.cuda.synchronize()
                r["first_calls_s"].append(time.perf_counter() - t0)
                if bsz == 1:
                    r["select_ms"] = bench(lambda: fused_selection(q, k, cfg, 0, None), long)
                del q, k, v
            log(r)
            rows.append(r)
            torch.cuda.empty_cache()
    flexwalk.options.set_options(triton_selection=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="check,compiles,rounds")
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--compile-lengths", default="8192,9000,12000,16384,20000,30000,32768,50000,100000,131072")
    ap.add_argument("--per-head-lengths", default="32768,131072")
    ap.add_argument("--check-cases", default=None, help="indices into CHECK_CASES to check (default: all)")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    RESULTS["env"] = env_info()
    log(RESULTS["env"])
    cases = CHECK_CASES if args.check_cases is None else [CHECK_CASES[i] for i in ints(args.check_cases)]
    sections = {"check": (check, (cases,)), "compiles": (compiles, (ints(args.compile_lengths),)),
                "rounds": (rounds, (ints(args.lengths),)), "per_head": (per_head, (ints(args.per_head_lengths),))}
    run_sections([(name, *sections[name]) for name in args.sections.split(",")], RESULTS,
                 os.path.join(args.out, "gpu_triton_selection.json"))


if __name__ == "__main__":
    main()
