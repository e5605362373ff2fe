"""GPU check and benchmark of flexwalk's Triton block-sparse prefill kernel (issue 5): one device call.

    PYTHONPATH=. python benchmarks/gpu_triton_prefill.py --out DIR [--sections check,tune,speed,rounds,tune_small,layout]
        [--lengths 8192,32768,131072] [--tune-lengths 32768,131072]

1. check: the Triton kernel (flexwalk.options.Options.prefill_kernel = "triton") against compiled flex
   ("flex") on the same selection: three layers with the walk carried, batch 2 with and without
   left padding, lengths off the bucket grid, head dims 64 and 128, bf16, blocks 128, 64 and
   q128kv64, dense tail 2.  Max |difference| and finiteness.
2. tune: the attention alone on one layer's selection of the Llama-3.1-8B attention shape
   (32 / 8 heads, head dim 128, bf16, 20% density, block 128, batch 1): flex as
   sparse_prefill runs it (kernel mask_mod; dense tail apart from 16K) against the Triton kernel
   under several tilings (BLOCK_N, warps, stages) and launch orders; and dense causal attention
   (every causal block listed) through both kernels against cuDNN SDPA, to see each kernel's
   efficiency apart from the selection.
3. speed: `sketchwalk_attention` (selection + mask + attention, the issue's "total") with each
   kernel, against SDPA flash and cuDNN measured in the same process, graph selection as
   shipped and with COMPILE_GRAPHED_SELECTION.
4. rounds: the whole layer with each kernel and cuDNN in interleaved rounds (7), per-round ratios
   and their median: the 128K ratio moves between runs by more than 5% otherwise.
5. tune_small: the same tilings on SmolLM2-135M's shape (head dim 64, block 64, batch 16).
6. layout: q, k, v strided as transformers passes them against contiguous, each kernel.
Writes DIR/gpu_triton_prefill.json.  Medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.nn.attention import SDPBackend

import flexwalk
from flexwalk import prefill
from flexwalk import SketchWalkConfig, sketchwalk_attention
from flexwalk.kernels.flex import flex, row_bounds
from flexwalk.prefill import dense_tail_start
from flexwalk.selection.driver import fused_selection_mask
from flexwalk.kernels.flex import dense_block_mask, kernel_mask_mod
from flexwalk.kernels.triton_prefill import block_mask_attention
from gpu_prefill import bench, block_spec, env_info, llama8b_qkv, log, run_sections, sdpa_ms, sdpa_times  # this folder is on sys.path as a script

RESULTS: dict = {}
DEV = "cuda"  # a CPU trial run of the logic sets "cpu" (triton's interpreter)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()
# (blocks, query heads, KV heads, head dim, n, left padding of row 1)
CHECK_CASES = [("128", 32, 8, 128, 3000, False), ("128", 32, 8, 128, 20000, True), ("128", 32, 8, 64, 8000, True),
               ("64", 9, 3, 64, 3000, True), ("64", 9, 3, 64, 20000, False), ("q128kv64", 32, 8, 128, 8000, True),
               ("q128kv64", 32, 8, 128, 20000, False), ("64", 4, 1, 256, 5000, True), ("128", 4, 1, 256, 3000, False)]


def outputs_by_kernel(q, k, v, cfg, key_valid, layers=3):
    """`layers` layers of `sketchwalk_attention` (walk carried) run with flex and with the Triton
    prefill kernel: ({kernel: [outputs]}, {kernel: counters})."""
    outs, counts = {}, {}
    try:
        for kernel in ("flex", "triton"):
            flexwalk.options.set_options(prefill_kernel=kernel)
            flexwalk.reset_counters()
            st, o = None, []
            for layer in range(layers):
                out, st = sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=key_valid)
                o.append(out)
            outs[kernel], counts[kernel] = o, dict(flexwalk.counters())
    finally:
        flexwalk.options.set_options(prefill_kernel="auto")
    return outs, counts


def check(cases=CHECK_CASES):
    rows = []
    for spec, hq, hkv, d, n, pad in cases:
        g = torch.Generator(device=DEV).manual_seed(n + d)
        q, k, v = (torch.randn(2, h, n, d, device=DEV, generator=g, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        kv = None
        if pad:
            kv = torch.ones(2, n, dtype=torch.bool, device=DEV)
            kv[1, : n // 3] = False
        cfg = SketchWalkConfig(**block_spec(spec), density=0.2, dense_layers=0, dense_below=0, dense_tail_blocks=2)
        outs, counters = outputs_by_kernel(q, k, v, cfg, kv)
        counts = {kernel: c.get("triton_prefill", 0) for kernel, c in counters.items()}
        diffs, finite = [], True
        for a, b in zip(outs["flex"], outs["triton"]):
            real = slice(None) if kv is None else kv[1]
            diffs.append(float((a[1][:, real].float() - b[1][:, real].float()).abs().max()))
            diffs.append(float((a[0].float() - b[0].float()).abs().max()))
            finite &= bool(torch.isfinite(b).all())
        r = dict(blocks=spec, hq=hq, hkv=hkv, d=d, n=n, padded=pad, max_abs_diff=max(diffs), finite=finite,
                 triton_calls=counts["triton"], triton_calls_under_flex=counts["flex"])
        rows.append(r)
        log(r)
        del q, k, v
    return rows


def _llama8b_qkv(n):
    return llama8b_qkv(n, DEV)


def _flex_as_shipped(q, k, v, bm, cfg, n):
    """flex as sparse_prefill runs it: kernel mask_mod, the dense tail apart where SPLIT_DENSE_TAIL says."""
    fast = kernel_mask_mod()
    tiles = dict(block_size=cfg.block_size, q_block=cfg.q_block, scale=None, softcap=None)
    r0 = dense_tail_start(cfg, n, q.device)
    if r0 is None:
        return lambda: flex(q, k, v, bm, kernel_mask_mod=fast, **tiles)
    return lambda: prefill._with_dense_tail(q, k, v, bm, r0, None, fast, tiles)


TILINGS = [  # (BLOCK_N, num_warps, num_stages, reverse)
    (128, 8, 3, True), (128, 8, 2, True), (64, 8, 3, True), (64, 4, 3, True), (32, 4, 3, True), (128, 8, 4, True),
    (128, 8, 3, False),
]


def tune(lengths, tilings=TILINGS, spec="128"):
    rows = []
    for n in lengths:
        long = n >= 65536
        q, k, v = _llama8b_qkv(n)
        t_cudnn = sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, long)
        r = dict(n=n, sdpa_cudnn_ms=t_cudnn)
        cfg = SketchWalkConfig(**block_spec(spec), density=0.2, dense_layers=0, dense_below=0)
        r["blocks"] = spec
        bm, _, kept, causal = fused_selection_mask(q, k, cfg, 0, None)
        r["density"] = float(kept.sum() / causal.sum())
        start, end = row_bounds(1, n, None, q.device)
        flex_fn = _flex_as_shipped(q, k, v, bm, cfg, n)
        r["flex_ms"] = bench(flex_fn, long)
        ref = flex_fn()
        for bn, w, s, rev in tilings:
            tag = f"triton_n{bn}_w{w}_s{s}{'' if rev else '_ascending'}"
            try:
                fn = lambda: block_mask_attention(q, k, v, bm, start, end, block_n=bn, num_warps=w,  # noqa: E731
                                                  num_stages=s, reverse=rev)
                out = fn()
                r[tag + "_max_abs_diff"] = float((out.float() - ref.float()).abs().max())
                r[tag + "_ms"] = bench(fn, long)
            except Exception as e:  # a tiling that does not fit shared memory
                r[tag + "_error"] = repr(e)[:300]
            log(n, tag, r.get(tag + "_ms"), r.get(tag + "_max_abs_diff"), r.get(tag + "_error", ""))
        best = min((x for x in r if x.startswith("triton") and x.endswith("_ms")), key=lambda x: r[x], default=None)
        if best:
            r["best_triton"] = best
            log(f"{n}: cudnn {t_cudnn:.3f} flex {r['flex_ms']:.3f} best triton {best} {r[best]:.3f} ms -> "
                f"attention alone x{t_cudnn / r[best]:.2f} (flex x{t_cudnn / r['flex_ms']:.2f})")
        if n <= 32768 and spec == "128":  # dense causal: each kernel's efficiency apart from any selection
            dm = dense_block_mask(1, n, n, 128, q.device)
            r["dense_flex_ms"] = bench(lambda: flex(q, k, v, dm, block_size=128), long)
            r["dense_triton_ms"] = bench(lambda: block_mask_attention(q, k, v, dm, start, end), long)
            log(f"{n}: dense causal cudnn {t_cudnn:.3f} flex {r['dense_flex_ms']:.3f} triton {r['dense_triton_ms']:.3f}")
        rows.append(r)
        del q, k, v, bm, ref
        _empty_cache()
    return rows


SMALL_TILINGS = [(64, 4, 3, True), (64, 4, 2, True), (32, 4, 3, True), (64, 8, 3, True), (64, 4, 4, True),
                 (64, 4, 3, False)]


def tune_small(lengths, tilings=SMALL_TILINGS):
    """The attention alone on SmolLM2-135M's shape (9 / 3 heads, head dim 64, block 64), batch 16 (as
    in the NIAH runs): flex against the Triton kernel's tilings."""
    rows = []
    for n in lengths:
        g = torch.Generator(device=DEV).manual_seed(n)
        q, k, v = (torch.randn(16, h, n, 64, device=DEV, generator=g, dtype=torch.bfloat16) for h in (9, 3, 3))
        t_cudnn = sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION)
        cfg = SketchWalkConfig(block_size=64, density=0.2, dense_layers=0, dense_below=0)
        bm, _, kept, causal = fused_selection_mask(q, k, cfg, 0, None)
        start, end = row_bounds(16, n, None, q.device)
        tiles = dict(block_size=64, q_block=64, scale=None, softcap=None)
        r = dict(n=n, batch=16, sdpa_cudnn_ms=t_cudnn, density=float(kept.sum() / causal.sum()),
                 flex_ms=bench(lambda: flex(q, k, v, bm, kernel_mask_mod=kernel_mask_mod(), **tiles)))
        for bn, w, s, rev in tilings:
            tag = f"triton_n{bn}_w{w}_s{s}{'' if rev else '_ascending'}"
            try:
                r[tag + "_ms"] = bench(lambda: block_mask_attention(q, k, v, bm, start, end, block_n=bn, num_warps=w,
                                                                    num_stages=s, reverse=rev))
            except Exception as e:
                r[tag + "_error"] = repr(e)[:300]
        log(r)
        rows.append(r)
        del q, k, v, bm
        _empty_cache()
    return rows


def layout(lengths):
    """The attention alone on q, k, v laid out as transformers hands them over ([B, n, H, D] memory
    viewed as [B, H, n, D]) against contiguous [B, H, n, D]: each kernel, and the Triton kernel
    after a contiguous copy (copy included)."""
    rows = []
    for n in lengths:
        long = n >= 65536
        qc, kc, vc = _llama8b_qkv(n)
        qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (qc, kc, vc))
        cfg = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0)
        bm, _, _, _ = fused_selection_mask(qc, kc, cfg, 0, None)
        start, end = row_bounds(1, n, None, qc.device)
        r = dict(n=n)
        for tag, (q, k, v) in (("contiguous", (qc, kc, vc)), ("strided", (qs, ks, vs))):
            r[f"flex_{tag}_ms"] = bench(_flex_as_shipped(q, k, v, bm, cfg, n), long)
            r[f"triton_{tag}_ms"] = bench(lambda: block_mask_attention(q, k, v, bm, start, end), long)
        r["triton_strided_copied_ms"] = bench(
            lambda: block_mask_attention(qs.contiguous(), ks.contiguous(), vs.contiguous(), bm, start, end), long)
        log(r)
        rows.append(r)
        del qc, kc, vc, qs, ks, vs, bm
        _empty_cache()
    return rows


def speed(lengths):
    rows = []
    for n in lengths:
        long = n >= 65536
        q, k, v = _llama8b_qkv(n)
        t_flash, t_cudnn = sdpa_times(q, k, v, long)
        r = dict(n=n, sdpa_flash_ms=t_flash, sdpa_cudnn_ms=t_cudnn)
        cfg = SketchWalkConfig(**block_spec("128"), density=0.2, dense_layers=0, dense_below=0)
        for comp in (False, True):
            flexwalk.options.set_options(compile_graphed_selection=comp)
            for kernel in ("flex", "triton"):
                flexwalk.options.set_options(prefill_kernel=kernel)
                tag = f"{kernel}{'_compiled_graph' if comp else ''}"
                _sync()
                t0 = time.perf_counter()
                sketchwalk_attention(q, k, v, cfg, 0)
                _sync()
                r[tag + "_first_call_s"] = time.perf_counter() - t0
                t_total = bench(lambda: sketchwalk_attention(q, k, v, cfg, 0), long)
                r[tag + "_total_ms"] = t_total
                r[tag + "_speedup_vs_cudnn"] = t_cudnn / t_total
                log(f"{n:>6} {tag:>22}: total {t_total:.3f} ms | cudnn {t_cudnn:.3f} flash {t_flash:.3f} -> "
                    f"x{t_cudnn / t_total:.2f}")
            r[f"select_mask{'_compiled_graph' if comp else ''}_ms"] = bench(
                lambda: fused_selection_mask(q, k, cfg, 0, None), long)
        flexwalk.options.set_options(prefill_kernel="auto", compile_graphed_selection=False)
        rows.append(r)
        del q, k, v
        _empty_cache()
    return rows


def rounds(lengths, n_rounds=7):
    """The whole layer (`sketchwalk_attention`, Triton kernel and flex) and cuDNN SDPA timed in
    interleaved rounds, so clock drift hits all three alike: per-round ratios and their median."""
    rows = []
    cfg = SketchWalkConfig(**block_spec("128"), density=0.2, dense_layers=0, dense_below=0)
    for n in lengths:
        long = n >= 65536
        q, k, v = _llama8b_qkv(n)
        for kernel in ("triton", "flex"):  # compile and capture outside the rounds
            flexwalk.options.set_options(prefill_kernel=kernel)
            sketchwalk_attention(q, k, v, cfg, 0)
        r = dict(n=n, cudnn_ms=[], triton_ms=[], flex_ms=[])
        for _ in range(n_rounds):
            r["cudnn_ms"].append(sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, long))
            for kernel in ("triton", "flex"):
                flexwalk.options.set_options(prefill_kernel=kernel)
                r[f"{kernel}_ms"].append(bench(lambda: sketchwalk_attention(q, k, v, cfg, 0), long))
        flexwalk.options.set_options(prefill_kernel="auto")
        for kernel in ("triton", "flex"):
            ratios = sorted(c / t for c, t in zip(r["cudnn_ms"], r[f"{kernel}_ms"]))
            r[f"{kernel}_speedup_per_round"] = ratios
            r[f"{kernel}_speedup_median"] = ratios[len(ratios) // 2]
        log(f"{n}: triton x{r['triton_speedup_median']:.2f} (rounds {', '.join(f'{x:.2f}' for x in r['triton_speedup_per_round'])}); "
            f"flex x{r['flex_speedup_median']:.2f}; cudnn {', '.join(f'{x:.1f}' for x in r['cudnn_ms'])} ms")
        rows.append(r)
        del q, k, v
        _empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="check,tune,speed")
    ap.add_argument("--lengths", default="8192,16384,32768,131072")
    ap.add_argument("--tune-lengths", default="8192,32768,131072")
    ap.add_argument("--small-lengths", default="4096,8192")
    ap.add_argument("--tune-blocks", default="128", help="block configuration of the tune section: 128, 64, q128kv64")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    RESULTS["env"] = env_info()
    log(RESULTS["env"])
    sections = {"check": (check, ()), "tune": (tune, (ints(args.tune_lengths), TILINGS, args.tune_blocks)),
                "speed": (speed, (ints(args.lengths),)), "tune_small": (tune_small, (ints(args.small_lengths),)),
                "layout": (layout, (ints(args.tune_lengths),)), "rounds": (rounds, (ints(args.lengths),))}
    run_sections([(name, *sections[name]) for name in args.sections.split(",")], RESULTS,
                 os.path.join(args.out, "gpu_triton_prefill.json"))

if __name__ == "__main__":
    main()
