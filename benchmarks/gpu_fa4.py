"""GPU check and benchmark of the FlashAttention 4 prefill kernel (flexwalk.kernels.fa4, issue 5).

FA4 (`flash_attn.cute`) is not in the GPU image: its wheels travel in pieces (benchmarks/gpu_accuracy.sh
`pieces fa4`, `store`, `wheels`), and this script runs through that script's environment:

    bash benchmarks/gpu_accuracy.sh py benchmarks/gpu_fa4.py --out DIR [--sections env,check,dense,kernel,rounds,shapes,ttft]

1. env: versions, and FA4's first-call (JIT compile) time.
2. check: the layer with PREFILL_KERNEL "fa4" (both MASK settings) against "triton" on the same selection, three layers
   with the walk carried, bf16, 8B attention shape (32 / 8 heads, head dim 128), block 128, dense
   tail 2, lengths off the block grid, batch 1 and 2; max |difference|, finiteness and the
   counters (which kernel ran).  A padded batch and a residual config must fall back to Triton.
3. dense: dense causal attention alone, cuDNN SDPA against FA4 (no block lists) and against
   FA4 and the Triton kernel on block lists that keep every causal block.
4. kernel: the attention alone on one layer's 20% selection: Triton kernel and FA4 (both
   Options.fa4_mask settings) on the same lists, against cuDNN, in interleaved rounds.
5. rounds: the whole layer (`sketchwalk_attention`: selection, lists, attention) with each kernel
   against cuDNN, interleaved rounds, per-round ratios and their median.
6. shapes: FA4 on SmolLM2's, Gemma 3's and a 64-token-block 8B shape (attention alone, 20%),
   against the Triton kernel and flex.
7. ttft: time to first token of the 8B-shaped random model (bf16, batch 1, block 128, density
   0.2, dense_below 8192, dense_layers "auto" = 2): sdpa, then sketchwalk_flex with each kernel.
Writes DIR/gpu_fa4.json.  Medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.nn.attention import SDPBackend

import flexwalk
from flexwalk.kernels import flex as flexwalk_flex
from flexwalk import SketchWalkConfig, fa4_prefill, sketchwalk_attention, triton_prefill
from flexwalk.kernels.flex import row_bounds
from flexwalk.selection.driver import fused_selection
from gpu_prefill import (_fa4_compiled, _prompt, _sync, bench, env_info, llama8b_qkv, log,  # noqa: E402
                         run_sections, sdpa_ms)

RESULTS: dict = {}
KERNELS = ("triton", "fa4")


def _cfg(**kw):
    return SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0, **kw)


def env():
    import importlib.metadata as md

    out = env_info()
    for name in ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["fa4_available"] = fa4_prefill.available()
    q, k, v = llama8b_qkv(4096)
    from flash_attn.cute import flash_attn_func

    flexwalk.options.set_options(prefill_kernel="fa4")
    for tag, fn in (("dense_causal", lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), causal=True)),
                    ("block_sparse", lambda: sketchwalk_attention(q, k, v, _cfg(), 0))):
        _sync(q.device)
        t0 = time.perf_counter()
        fn()
        _sync(q.device)
        out[f"first_call_{tag}_s"] = time.perf_counter() - t0
    # recompiles: ten prompt lengths in one bucket after a warm-up (FA4's compile key holds no length)
    before = _fa4_compiled()
    for n in range(4100, 5121, 113):
        qq, kk, vv = llama8b_qkv(n)
        sketchwalk_attention(qq, kk, vv, _cfg(), 0)
    out["fa4_compiled_kernels_before_after_ten_lengths"] = (before, _fa4_compiled())
    flexwalk.options.set_options(prefill_kernel="auto")
    log(out)
    return out


CHECK_CASES = [(1, 8192, False, {}), (2, 3000, False, {}), (2, 20000, False, {}), (1, 40000, False, {}),
               (2, 5000, True, {}), (1, 5000, False, {"residual": True})]


def check(cases=CHECK_CASES):
    rows = []
    for batch, n, pad, extra in cases:
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(batch, h, n, 128, device="cuda", generator=g, dtype=torch.bfloat16) for h in (32, 8, 8))
        kv = None
        if pad:
            kv = torch.ones(batch, n, dtype=torch.bool, device="cuda")
            kv[1, : n // 3] = False
        cfg = _cfg(dense_tail_blocks=2, **extra)
        outs, counts = {}, {}
        try:
            for kernel in ("triton", "fa4", "fa4_mask_mod", "flex"):
                flexwalk.options.set_options(prefill_kernel=kernel.split("_")[0])
                flexwalk.options.set_options(fa4_mask="mask_mod" if kernel == "fa4_mask_mod" else "causal")
                flexwalk.reset_counters()
                st, o = None, []
                for layer in range(3):
                    out, st = sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=kv)
                    o.append(out)
                outs[kernel] = o
                counts[kernel] = {c: flexwalk.counters().get(c, 0) for c in ("fa4_prefill", "triton_prefill")}
        finally:
            flexwalk.options.set_options(prefill_kernel="auto", fa4_mask="causal")
        real = slice(None) if kv is None else kv[-1]
        r = dict(batch=batch, n=n, padded=pad, **extra, counters=counts, finite=all(bool(torch.isfinite(x).all()) for x in outs["fa4"]))
        for a_name, b_name in (("fa4", "triton"), ("fa4_mask_mod", "triton"), ("fa4", "flex"), ("triton", "flex")):
            r[f"max_abs_diff_{a_name}_{b_name}"] = max(
                float((a[..., real, :].float() - b[..., real, :].float()).abs().max())
                for a, b in zip(outs[a_name], outs[b_name]))
        rows.append(r)
        log(r)
        del q, k, v, outs
        torch.cuda.empty_cache()
    return rows


def _lists(q, k, cfg):
    tables, _, kept, causal = fused_selection(q, k, cfg, 0, None)
    return tables, float(kept.sum() / causal.sum())


def _sparse_fns(q, k, v, tables, block):
    """The attention alone on a selection's tables: {"triton": ..., "fa4": ...} (FA4 with the
    Options.fa4_mask in force when called)."""
    p_cnt, p_idx, f_cnt, f_idx, _, start, end = tables
    return {
        "triton": lambda: triton_prefill.sparse_prefill_attention(
            q, k, v, f_cnt, f_idx, p_cnt, p_idx, start, end, q_block=block, kv_block=block),
        "fa4": lambda: fa4_prefill.sparse_prefill_attention(q, k, v, f_cnt, f_idx, p_cnt, p_idx, q_block=block,
                                                            kv_block=block),
    }


def _all_causal_lists(n, device):
    """Block lists keeping every causal block: the diagonal partial, everything below it full."""
    nq = -(-n // 128)
    rows = torch.arange(nq, device=device, dtype=torch.int32)
    cols = torch.arange(nq, device=device, dtype=torch.int32)
    f_cnt = rows[None].clone()
    f_idx = torch.where(cols[None, :] < rows[:, None], cols[None, :], 0)[None].to(torch.int32)
    p_cnt = torch.ones(1, nq, dtype=torch.int32, device=device)
    p_idx = rows.view(1, nq, 1).clone()
    return f_cnt, f_idx.contiguous(), p_cnt, p_idx


def dense(lengths):
    from flash_attn.cute import flash_attn_func

    rows = []
    for n in lengths:
        long = n >= 65536
        q, k, v = llama8b_qkv(n)
        start, end = row_bounds(1, n, None, q.device)
        f_cnt, f_idx, p_cnt, p_idx = _all_causal_lists(n, q.device)
        r = dict(n=n, cudnn_ms=sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, long),
                 flash2_ms=sdpa_ms(q, k, v, SDPBackend.FLASH_ATTENTION, long))
        r["fa4_causal_ms"] = bench(lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           causal=True), long)
        r["fa4_all_blocks_ms"] = bench(lambda: fa4_prefill.sparse_prefill_attention(
            q, k, v, f_cnt, f_idx, p_cnt, p_idx, q_block=128, kv_block=128), long)
        r["triton_all_blocks_ms"] = bench(lambda: triton_prefill.sparse_prefill_attention(
            q, k, v, f_cnt, f_idx, p_cnt, p_idx, start, end, q_block=128, kv_block=128), long)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = fa4_prefill.sparse_prefill_attention(q, k, v, f_cnt, f_idx, p_cnt, p_idx, q_block=128, kv_block=128)
        r["fa4_all_blocks_vs_sdpa_max_abs_diff"] = float((out.float() - ref.float()).abs().max())
        for key in ("fa4_causal_ms", "fa4_all_blocks_ms", "triton_all_blocks_ms"):
            r[key.replace("_ms", "_vs_cudnn")] = r["cudnn_ms"] / r[key]
        log(r)
        rows.append(r)
        del q, k, v, ref, out
        torch.cuda.empty_cache()
    return rows


def _interleaved(q, k, v, fns: dict, n_rounds: int, long: bool) -> dict:
    """cuDNN SDPA and each of `fns` timed in turn, `n_rounds` rounds (clock drift hits all alike):
    the times, and per function the median of its per-round speedups over cuDNN."""
    r = dict(cudnn_ms=[], **{f"{name}_ms": [] for name in fns})
    for _ in range(n_rounds):
        r["cudnn_ms"].append(sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, long))
        for name, fn in fns.items():
            r[f"{name}_ms"].append(bench(fn, long))
    for name in fns:
        ratios = sorted(c / t for c, t in zip(r["cudnn_ms"], r[f"{name}_ms"]))
        r[f"{name}_speedup_per_round"] = ratios
        r[f"{name}_speedup_median"] = ratios[len(ratios) // 2]
    return r


def kernel(lengths, n_rounds=3):
    """The attention alone on one layer's selection lists: the Triton kernel and FA4."""
    rows = []
    for n in lengths:
        q, k, v = llama8b_qkv(n)
        tables, dens = _lists(q, k, _cfg())
        base = _sparse_fns(q, k, v, tables, 128)
        fns = {"triton": base["triton"]}
        for mask in flexwalk.options.FA4_MASKS:  # FA4 with each way of masking the diagonal (Options.fa4_mask)
            def fa4(mask=mask):
                flexwalk.options.set_options(fa4_mask=mask)
                return base["fa4"]()
            fns["fa4" if mask == "causal" else f"fa4_{mask}"] = fa4
        ref = fns["triton"]()
        diffs = {f"max_abs_diff_{name}": float((fn().float() - ref.float()).abs().max()) for name, fn in fns.items()
                 if name != "triton"}
        r = dict(n=n, density=dens, **diffs, **_interleaved(q, k, v, fns, n_rounds, n >= 65536))
        flexwalk.options.set_options(fa4_mask="causal")
        for name in fns:
            if name != "triton":
                r[f"{name}_over_triton_speed"] = sorted(t / f for t, f in zip(r["triton_ms"], r[f"{name}_ms"]))[
                    n_rounds // 2]
        log(r)
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def rounds(lengths, n_rounds=5):
    """The whole layer (selection, lists, attention) with each kernel."""
    rows = []
    cfg = _cfg()
    for n in lengths:
        q, k, v = llama8b_qkv(n)

        def layer(kern):
            def run():
                flexwalk.options.set_options(prefill_kernel=kern)
                return sketchwalk_attention(q, k, v, cfg, 0)
            return run

        fns = {kern: layer(kern) for kern in KERNELS}
        for fn in fns.values():  # compile and capture outside the rounds
            fn()
        r = dict(n=n, **_interleaved(q, k, v, fns, n_rounds, n >= 65536))
        flexwalk.options.set_options(prefill_kernel="auto")
        log(f"{n}: " + "; ".join(f"{kern} x{r[f'{kern}_speedup_median']:.2f}" for kern in KERNELS)
            + f"; cudnn {', '.join(f'{x:.2f}' for x in r['cudnn_ms'])} ms")
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


SHAPE_CASES = [  # (name, query heads, KV heads, head dim, block, batch, n)
    ("smollm2", 9, 3, 64, 64, 16, 8192), ("gemma3", 4, 1, 256, 64, 4, 32768), ("8b-block64", 32, 8, 128, 64, 1, 32768)]


def shapes(cases=SHAPE_CASES):
    """FA4 on the other shapes flexwalk runs (fa4.SHAPES holds only the measured one): the
    attention alone on a 20% selection, FA4 against the Triton kernel and flex as shipped, and
    their max |difference|.  FA4 fits its Hopper tile to the sparse block (64-row tiles, 64-key
    tiles), so whether these are worth it is a measurement."""
    from gpu_triton_prefill import _flex_as_shipped

    rows = []
    for name, hq, hkv, d, bs, batch, n in cases:
        g = torch.Generator(device="cuda").manual_seed(n + d)
        q, k, v = (torch.randn(batch, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        cfg = SketchWalkConfig(block_size=bs, density=0.2, dense_layers=0, dense_below=0)
        tables, dens = _lists(q, k, cfg)
        bm = flexwalk_flex.tables_block_mask(tables, cfg, flexwalk_flex.bucket_length(n))  # the same selection's BlockMask
        fns = {"flex": _flex_as_shipped(q, k, v, bm, cfg, n), **_sparse_fns(q, k, v, tables, bs)}
        r = dict(case=name, hq=hq, hkv=hkv, d=d, block=bs, batch=batch, n=n, density=dens)
        try:
            ref = fns["triton"]()
            r["fa4_vs_triton_max_abs_diff"] = float((fns["fa4"]().float() - ref.float()).abs().max())
            r.update(_interleaved(q, k, v, fns, 3, False))
        except Exception as e:  # FA4 may refuse a shape: record why
            r["error"] = f"{type(e).__name__}: {e}"[:400]
        log(r)
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def ttft(lengths, reps=2):
    from transformers import AutoModelForCausalLM

    from gpu_decode import _llama8b_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(_llama8b_config(), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    sw = SketchWalkConfig(block_size=128, density=0.2, dense_below=8192)
    out = {"config": sw.to_dict()}
    for n in lengths:
        ids = _prompt(n, model.config.vocab_size, model.device)
        for impl in ("sdpa", "triton", "fa4"):
            if impl == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                flexwalk.configure(model, sw)
                flexwalk.options.set_options(prefill_kernel=impl)
            times = []
            with torch.no_grad():
                model(ids, use_cache=False, logits_to_keep=1)  # warm-up: compiles and captures what is new
                torch.cuda.reset_peak_memory_stats()
                for _ in range(reps):
                    flexwalk.reset_counters()
                    _sync(model.device)
                    t0 = time.perf_counter()
                    model(ids, use_cache=False, logits_to_keep=1)
                    _sync(model.device)
                    times.append(time.perf_counter() - t0)
            rec = dict(ttft_s=min(times), times_s=times, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                       counters=dict(flexwalk.counters()))
            out[f"{n}/{impl}"] = rec
            log(f"TTFT {n} {impl}: {rec['ttft_s']:.3f} s, peak {rec['peak_gib']:.1f} GiB, {rec['counters']}")
        flexwalk.options.set_options(prefill_kernel="auto")
        for impl in ("triton", "fa4"):
            out[f"{n}/{impl}_speedup"] = out[f"{n}/sdpa"]["ttft_s"] / out[f"{n}/{impl}"]["ttft_s"]
        log(f"TTFT {n}: triton x{out[f'{n}/triton_speedup']:.2f}, fa4 x{out[f'{n}/fa4_speedup']:.2f}")
    model.set_attn_implementation("sdpa")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="env,check,dense,kernel,rounds")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--ttft-lengths", default="32768,131072")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    sections = {"env": (env, ()), "check": (check, ()), "dense": (dense, (ints(args.lengths),)),
                "kernel": (kernel, (ints(args.lengths),)), "rounds": (rounds, (ints(args.lengths),)),
                "shapes": (shapes, ()), "ttft": (ttft, (ints(args.ttft_lengths),))}
    run_sections([(name, *sections[name]) for name in args.sections.split(",")], RESULTS,
                 os.path.join(args.out, "gpu_fa4.json"))


if __name__ == "__main__":
    main()
