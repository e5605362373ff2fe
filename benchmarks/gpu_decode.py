"""GPU decode benchmark and checks (issue 3): one script, one device call.

    python benchmarks/gpu_decode.py --out DIR [--quick]

1. Correctness on the GPU: tiny Llama, generate() with DynamicCache and StaticCache (which
   transformers compiles by itself on CUDA) at full budget == sdpa tokens; compiled step core
   == eager; recompiles over 64 tokens after warm-up.
2. Decode-step attention, Llama-3.1-8B attention shape (32 query / 8 KV heads, head dim 128),
   bf16, KV 32K / 128K, batch 1 / 8, density 10% / 20%: SDPA (enable_gqa) vs flex with a
   one-row BlockMask in two layouts (G query heads as rows with a 1-head mask, or GQA), and
   the whole sparse step (state update + selection + mask + flex).
3. decode_scoring "sketch" against "bound": one layer's whole step at 32K / 128K.
4. End to end: Llama-3.1-8B-shaped random-weight model, 32K context, batch 1: decode
   tokens/s with sketchwalk_flex (sparse decode) vs sdpa, static and dynamic caches.
Writes DIR/gpu_decode.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import flexwalk  # noqa: E402
from flexwalk import DecodeState, SketchWalkConfig, sketchwalk_decode  # noqa: E402
from flexwalk.kernels.flex import compiled_flex  # noqa: E402
import flexwalk.decode  # noqa: E402
from flexwalk.kernels.flex import decode_block_mask  # noqa: E402
from flexwalk.integrations.cache_kwarg import cache_kwargs  # noqa: E402
from flexwalk.kernels.triton_decode import sparse_decode_attention  # noqa: E402

RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


def cuda_time(fn, iters=50, warmup=5) -> float:
    """Mean milliseconds per call, CUDA events around `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def gpu_kernel_ms(fn, iters=10) -> float:
    """Milliseconds of GPU kernel time per call (profiler sum), without the host's launch cost."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1e3 / iters


def section(name):
    def wrap(fn):
        def run(*a, **kw):
            log(f"\n=== {name} ===")
            t = time.time()
            try:
                RESULTS[name] = fn(*a, **kw)
            except Exception as e:  # keep going: one broken section must not hide the others
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"({name}: {time.time() - t:.1f} s)")

        return run

    return wrap


@section("correctness")
def correctness():
    from tiny_models import build_model, random_ids

    out = {}
    cfg = SketchWalkConfig(block_size=16, density=1.0, dense_below=0, dense_layers=1, skip_decode=False)
    ids = random_ids(2, 100, seed=1).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    for dtype in (torch.float32, torch.bfloat16):
        ref = build_model("llama", "sdpa", dtype).cuda()
        m = flexwalk.configure(build_model("llama", "sketchwalk_flex", dtype).cuda(), cfg)
        for cache in (None, "static"):
            flexwalk.reset_counters()
            with torch.no_grad():
                a = ref.generate(ids, attention_mask=mask, cache_implementation=cache, **gen)
                b = m.generate(ids, attention_mask=mask, cache_implementation=cache, **gen)
            key = f"{dtype}/{cache or 'dynamic'}"
            out[key] = {"equal_tokens": bool(torch.equal(a, b)), "counters": flexwalk.counters()}
            log(key, out[key])
    # the tiny model again with the flex decode kernel (the default above is the Triton kernel)
    flexwalk.options.set_options(decode_kernel="flex")
    try:
        for dtype in (torch.float32, torch.bfloat16):
            ref = build_model("llama", "sdpa", dtype).cuda()
            m = flexwalk.configure(build_model("llama", "sketchwalk_flex", dtype).cuda(), cfg)
            with torch.no_grad():
                a = ref.generate(ids, attention_mask=mask, cache_implementation="static", **gen)
                b = m.generate(ids, attention_mask=mask, cache_implementation="static", **gen)
            out[f"flex_kernel/{dtype}/static"] = bool(torch.equal(a, b))
            log(f"flex kernel {dtype} static equal tokens:", out[f"flex_kernel/{dtype}/static"])
    finally:
        flexwalk.options.set_options(decode_kernel="auto")
    out["triton_kernel_vs_oracle"] = triton_vs_oracle()
    out["cuda_graph_vs_eager"] = graph_vs_eager(ids, mask, cfg, gen)
    # compiled step core vs eager
    q, k, v = (torch.randn(2, h, 600, 128, device="cuda") for h in (32, 8, 8))
    c = SketchWalkConfig(block_size=64, density=0.2)
    st_a = DecodeState.from_prefill(q[:, :, :500], k[:, :, :500], c, 3)
    st_b = DecodeState.from_prefill(q[:, :, :500], k[:, :, :500], c, 3)
    worst = 0.0
    for t in range(500, 520):
        ra = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], st_a)  # compiled on CUDA
        with flexwalk.options(compile_decode="never"):  # eager reference
            rb = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], st_b)
        worst = max(worst, (ra[0] - rb[0]).abs().max().item())
    out["compiled_vs_eager_max_err"] = worst
    log("compiled step core vs eager, max |out| diff:", worst)
    # recompiles over 64 tokens after warm-up (dynamic cache, sparse budget)
    from torch._dynamo.utils import counters as dc

    m = flexwalk.configure(build_model("llama", "sketchwalk_flex", torch.bfloat16).cuda(),
                           cfg.replace(density=0.2, dense_layers=0))
    g = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        m.generate(random_ids(1, 70, seed=2).cuda(), **g)
        before = dc["stats"]["unique_graphs"]
        m.generate(random_ids(1, 70, seed=3).cuda(), **g)
        m.generate(random_ids(1, 90, seed=4).cuda(), **g)
    out["new_graphs_after_warmup"] = dc["stats"]["unique_graphs"] - before
    log("new compiled graphs after warm-up (2 x 64 tokens):", out["new_graphs_after_warmup"])
    return out


def graph_vs_eager(ids, mask, cfg, gen):
    """The decode step replayed from CUDA graphs vs run eagerly: functional API over 40 steps
    of a static layout (outputs, rows and final state), and generate() on a tiny Llama."""
    res = {}
    q, k, v = (torch.randn(2, h, 3000, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8))
    c = SketchWalkConfig(block_size=128, density=0.2)
    states = {g: DecodeState.from_prefill(q[:, :, :2900], k[:, :, :2900], c, 3, kv_tokens=3000, growable=False)
              for g in (True, False)}
    worst = 0.0
    for t in range(2900, 2940):
        outs = {}
        for g, st in states.items():
            flexwalk.options.set_options(decode_graphs=g)
            try:
                outs[g] = sketchwalk_decode(q[:, :, t : t + 1].clone(), k, v, st, position=torch.tensor(t, device="cuda"))
                outs[g] = tuple(x.clone() for x in outs[g])
            finally:
                flexwalk.options.set_options(decode_graphs=True)
        worst = max(worst, (outs[True][0].float() - outs[False][0].float()).abs().max().item(),
                    (outs[True][1] - outs[False][1]).abs().max().item())
    state_diff = max((getattr(states[True], f) - getattr(states[False], f)).abs().max().item()
                     for f in ("k_sum", "k_count", "k_sketch", "q_sum", "q_count", "transition"))
    # the key bounds (decode_scoring="bound") are picked, not summed: equal, +-inf in empty blocks
    bounds = states[True].k_bounds
    res["bounds_equal"] = bounds is None or torch.equal(bounds, states[False].k_bounds)
    res["functional_max_diff"] = worst
    res["state_max_diff"] = state_diff
    res["graph_captured"] = states[True]._graph is not None
    log("CUDA graph vs eager step (functional, 40 steps): max out/row diff", worst, "state diff", state_diff,
        "bounds equal", res["bounds_equal"], "captured", res["graph_captured"])
    for dtype in (torch.float32, torch.bfloat16):
        m = flexwalk.configure(build_model_cuda("llama", dtype), cfg)
        toks = {}
        for g in (True, False):
            flexwalk.options.set_options(decode_graphs=g)
            flexwalk.reset_counters()
            try:
                with torch.no_grad():
                    toks[g] = m.generate(ids, attention_mask=mask, cache_implementation="static",
                                         output_scores=True, return_dict_in_generate=True, **gen)
            finally:
                flexwalk.options.set_options(decode_graphs=True)
            res[f"{dtype}/graphs={g}/counters"] = flexwalk.counters()
        same = bool(torch.equal(toks[True].sequences, toks[False].sequences))
        diff = max((a - b).abs().max().item() for a, b in zip(toks[True].scores, toks[False].scores))
        res[f"{dtype}/same_tokens"], res[f"{dtype}/max_logit_diff"] = same, diff
        log(f"generate static {dtype}: graphs vs eager same tokens {same}, max logit diff {diff:.3g}, counters "
            f"{res[f'{dtype}/graphs=True/counters']}")
    return res


def build_model_cuda(name, dtype):
    from tiny_models import build_model

    return build_model(name, "sketchwalk_flex", dtype).cuda()


def triton_vs_oracle():
    """The split-KV Triton kernel against the oracle (SDPA under the selection as a token mask),
    in every dtype, over head dims, GQA groups, block sizes, splits and softcap."""
    from conftest import reference_error_budget
    from test_triton_decode import random_selection, token_mask

    rows, worst_ratio = [], 0.0
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d, grp, bs, s, softcap, splits in [(128, 4, 128, 5000, None, None), (64, 8, 64, 3001, 30.0, 3),
                                               (256, 2, 128, 777, None, 1), (128, 1, 64, 4096, 50.0, None),
                                               (128, 7, 128, 20000, None, 5)]:
            bsz, hkv = 3, 2
            q = torch.randn(bsz, hkv * grp, 1, d, generator=g).to(dtype)
            k = torch.randn(bsz, hkv, s, d, generator=g).to(dtype)
            v = torch.randn(bsz, hkv, s, d, generator=g).to(dtype)
            kv_num, kv_idx, start, end = random_selection(g, bsz, s, bs, 0.3)
            mask = token_mask(kv_num, kv_idx, start, end, s, bs)
            keep = mask.any(-1).reshape(bsz)
            dev = [t.cuda() for t in (q, k, v, kv_num, kv_idx, start, end)]
            try:
                out = sparse_decode_attention(*dev, block_size=bs, softcap=softcap, splits=splits).cpu()
            except Exception as e:  # record and go on: one shape must not hide the others
                rows.append(dict(dtype=str(dtype), d=d, g=grp, bs=bs, s=s, error=f"{type(e).__name__}: {e}", ok=False))
                log(f"triton vs oracle {dtype} d{d} g{grp} bs{bs}: {type(e).__name__}: {e}")
                continue
            err, allowed = reference_error_budget(q[keep], k[keep], v[keep], mask[keep], out[keep], softcap=softcap)
            rows.append(dict(dtype=str(dtype), d=d, g=grp, bs=bs, s=s, softcap=softcap, err=err, allowed=allowed,
                             ok=err <= allowed))
            worst_ratio = max(worst_ratio, err / allowed)
            log(f"triton vs oracle {dtype} d{d} g{grp} bs{bs} S{s} cap {softcap}: err {err:.2e} budget {allowed:.2e}")
    return {"cases": rows, "all_ok": all(r["ok"] for r in rows), "worst_err_over_budget": worst_ratio}


@section("triton_tune")
def triton_tune():
    """Launch parameters of the Triton decode kernel at 128K, 20% of blocks: GPU kernel time."""
    from flexwalk.kernels.triton_decode import num_splits

    hq, hkv, d, n, bs = 32, 8, 128, 131072, 128
    nb = n // bs
    rows = []
    for bsz in (1, 8):
        k = torch.randn(bsz, hkv, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(bsz, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        bm = _one_row_mask(bsz, nb, int(0.2 * nb), bs, n, rows=hq // hkv)
        sel = (bm.kv_num_blocks.reshape(bsz), bm.kv_indices.reshape(bsz, -1),
               torch.zeros(bsz, dtype=torch.int32, device="cuda"), torch.tensor(n, dtype=torch.int32, device="cuda"))
        base = num_splits(bsz, hkv, nb, q.device)
        g_sdpa = gpu_kernel_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        for splits in sorted({max(1, base // 2), base, base * 2}):
            for warps in (4, 8):
                for stages in (1, 2, 3, 4):
                    try:
                        t = gpu_kernel_ms(lambda: sparse_decode_attention(q, k, v, *sel, block_size=bs, splits=splits,
                                                                          num_warps=warps, num_stages=stages))
                    except Exception as e:  # e.g. out of shared memory
                        log(f"B{bsz} splits {splits} warps {warps} stages {stages}: {type(e).__name__}")
                        continue
                    rows.append(dict(batch=bsz, splits=splits, default_splits=base, warps=warps, stages=stages,
                                     gpu_ms=t, sdpa_ms=g_sdpa, speedup=g_sdpa / t))
                    log(f"B{bsz} splits {splits:>3} warps {warps} stages {stages}: {t:.4f} ms (sdpa {g_sdpa:.4f}, "
                        f"x{g_sdpa / t:.2f})")
        del k, v
        torch.cuda.empty_cache()
    return rows


def _one_row_mask(bsz, nb, kept, bs, kv_tokens, rows, heads=1):
    """A random selection of `kept` blocks per row (sink and last block included)."""
    idx = torch.stack([torch.randperm(nb - 2, device="cuda")[: kept - 2] + 1 for _ in range(bsz)])
    idx = torch.cat([torch.zeros(bsz, 1, dtype=idx.dtype, device="cuda"), idx,
                     torch.full((bsz, 1), nb - 1, device="cuda")], 1)
    full = torch.arange(nb, device="cuda").expand(bsz, nb).clone()
    full[:, :kept] = idx
    num = torch.full((bsz,), kept, dtype=torch.int32, device="cuda")
    start = torch.zeros(bsz, dtype=torch.int32, device="cuda")
    end = torch.tensor(kv_tokens, dtype=torch.int32, device="cuda")
    bm = decode_block_mask(num, full.to(torch.int32), start, end, rows=rows, kv_tokens=kv_tokens, block_size=bs)
    if heads != 1:
        from torch.nn.attention.flex_attention import BlockMask

        bm = BlockMask.from_kv_blocks(
            bm.kv_num_blocks.expand(-1, heads, -1).contiguous(), bm.kv_indices.expand(-1, heads, -1, -1).contiguous(),
            bm.full_kv_num_blocks.expand(-1, heads, -1).contiguous(),
            bm.full_kv_indices.expand(-1, heads, -1, -1).contiguous(),
            BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths,
        )
    return bm


@section("decode_attention")
def decode_attention(quick: bool):
    rows = []
    hq, hkv, d = 32, 8, 128
    g = hq // hkv
    lengths = [32768, 131072]
    blocks = (128,) if quick else (128, 64)
    for n in lengths:
        for bsz in (1, 8):
            k = torch.randn(bsz, hkv, n, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(bsz, hq, 1, d, device="cuda", dtype=torch.bfloat16)
            sdpa = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            for bs in blocks:
                nb = n // bs
                for density in (0.1, 0.2):
                    kept = max(3, int(density * nb))
                    bm_rows = _one_row_mask(bsz, nb, kept, bs, n, rows=g)
                    bm_rows_h = _one_row_mask(bsz, nb, kept, bs, n, rows=g, heads=hkv)
                    bm_gqa = _one_row_mask(bsz, nb, kept, bs, n, rows=1)
                    qv = q.reshape(bsz, hkv, g, d)
                    t_rows = cuda_time(lambda: compiled_flex(qv, k, v, block_mask=bm_rows))
                    t_rows_h = cuda_time(lambda: compiled_flex(qv, k, v, block_mask=bm_rows_h))
                    t_gqa = cuda_time(lambda: compiled_flex(q, k, v, block_mask=bm_gqa, enable_gqa=True))
                    sel = (bm_rows.kv_num_blocks.reshape(bsz), bm_rows.kv_indices.reshape(bsz, -1),
                           torch.zeros(bsz, dtype=torch.int32, device="cuda"),
                           torch.tensor(n, dtype=torch.int32, device="cuda"))

                    def tri():
                        return sparse_decode_attention(q, k, v, *sel, block_size=bs)

                    t_tri = cuda_time(tri)
                    # the whole step: state update + selection + mask + flex (static layout)
                    cfg = SketchWalkConfig(block_size=bs, density=density)
                    pre = n - 200
                    state = DecodeState.from_prefill(k[:, :, :pre].float(), k[:, :, :pre], cfg, 3, kv_tokens=n,
                                                     growable=False)
                    row0 = torch.full((bsz, state.capacity), 1.0 / state.capacity, device="cuda")

                    def step():
                        return sketchwalk_decode(q, k, v, state, row0)

                    from torch._dynamo.utils import counters as dc

                    step()
                    graphs = dc["stats"]["unique_graphs"]
                    t_step = cuda_time(step, iters=30, warmup=5)  # steps: 1 + 35 + 11 (+ 46 flex) < 200 slots
                    new_graphs = dc["stats"]["unique_graphs"] - graphs
                    g_sdpa = gpu_kernel_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                    g_rows = gpu_kernel_ms(lambda: compiled_flex(qv, k, v, block_mask=bm_rows))
                    g_tri = gpu_kernel_ms(tri)
                    g_step = gpu_kernel_ms(step)
                    flexwalk.options.set_options(decode_kernel="flex")  # the whole step with flex, for comparison
                    try:
                        t_step_flex = cuda_time(step, iters=30, warmup=5)
                        g_step_flex = gpu_kernel_ms(step)
                    finally:
                        flexwalk.options.set_options(decode_kernel="auto")
                    r = dict(kv=n, batch=bsz, block=bs, density=density, kept_blocks=kept, sdpa_ms=sdpa,
                             flex_rows_1head_ms=t_rows, flex_rows_hkv_ms=t_rows_h, flex_gqa_ms=t_gqa,
                             sparse_step_ms=t_step, speedup_attention=sdpa / t_rows, speedup_step=sdpa / t_step,
                             gpu_sdpa_ms=g_sdpa, gpu_flex_ms=g_rows, gpu_step_ms=g_step,
                             gpu_speedup_attention=g_sdpa / g_rows, gpu_speedup_step=g_sdpa / g_step,
                             new_graphs_during_steps=new_graphs, triton_ms=t_tri, gpu_triton_ms=g_tri,
                             gpu_speedup_triton=g_sdpa / g_tri, speedup_triton=sdpa / t_tri,
                             sparse_step_flex_ms=t_step_flex, gpu_step_flex_ms=g_step_flex)
                    rows.append(r)
                    log(f"KV {n:>6} B {bsz} bs {bs:>3} d {density:.1f}: wall sdpa {sdpa:.3f} flex rows/1h {t_rows:.3f} "
                        f"rows/Hkv {t_rows_h:.3f} gqa {t_gqa:.3f} step {t_step:.3f} | GPU sdpa {g_sdpa:.3f} "
                        f"flex {g_rows:.3f} step {g_step:.3f} ms (x{g_sdpa / g_rows:.2f} / x{g_sdpa / g_step:.2f}) "
                        f"graphs+{new_graphs} | TRITON wall {t_tri:.3f} GPU {g_tri:.3f} (x{g_sdpa / g_tri:.2f}) | "
                        f"flex step wall {t_step_flex:.3f} GPU {g_step_flex:.3f}")
                    del state
            del k, v
            torch.cuda.empty_cache()
    return rows


@section("step_profile")
def step_profile():
    """Where the host time of one sparse decode step goes (CPU + CUDA profiler table)."""
    from torch.profiler import ProfilerActivity, profile

    n, bsz = 32768, 1
    k = torch.randn(bsz, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(bsz, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    state = DecodeState.from_prefill(k[:, :, : n - 100].float(), k[:, :, : n - 100], SketchWalkConfig(block_size=128),
                                     3, kv_tokens=n, growable=False)
    for _ in range(5):
        sketchwalk_decode(q, k, v, state)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            sketchwalk_decode(q, k, v, state)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    log(table)
    return {"table": table}


@section("scoring_cost")
def scoring_cost():
    """One layer's sparse decode step (state update + selection + Triton attention, CUDA graph
    replay) with decode_scoring "sketch" and "bound", Llama-3.1-8B attention shape, bf16, block
    128, density 0.2, batch 1 and 8, KV 32K / 128K; dense SDPA decode of the same layer for scale."""
    out = {}
    for n in (32768, 131072):
        for bsz in (1, 8):
            if bsz * n > 8 * 32768 * 2:  # 128K x 8 rows: 17 GB of K/V, skipped
                continue
            k = torch.randn(bsz, 8, n, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(bsz, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            row = {}
            for scoring in ("sketch", "bound"):
                cfg = SketchWalkConfig(block_size=128, density=0.2, decode_scoring=scoring, skip_decode=False)
                st = DecodeState.from_prefill(k[:, :, : n - 100].repeat_interleave(4, 1), k[:, :, : n - 100],
                                              cfg, 3, kv_tokens=n, growable=False)
                pos = torch.tensor(n - 100, device="cuda")

                def step(st=st, pos=pos):  # 55 steps through the cache's last 100 slots
                    sketchwalk_decode(q, k, v, st, position=pos)
                    pos.add_(1)

                row[scoring] = cuda_time(step)
                row[scoring + "_stale_steps"] = int(st.stale_steps)
            row["sdpa"] = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            out[f"n{n}/b{bsz}"] = row
            log(f"decode step, one layer, KV {n}, batch {bsz}:",
                row, "bound / sketch", round(row["bound"] / row["sketch"], 3))
            del k, v
    return out


def _llama8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


@section("end_to_end")
def end_to_end(quick: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    out = {}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(_llama8b_config(), torch_dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    steps = 32
    cfg = SketchWalkConfig(block_size=128, density=0.2, skip_decode=False, dense_below=8192)
    runs = [(32768, "static"), (32768, "dynamic"), (131072, "static")]
    if not quick:
        runs.append((131072, "dynamic"))
    for ctx, cache_kind in runs:
        ids = torch.randint(0, 128000, (1, ctx), device="cuda")
        for impl in ("sdpa", "sketchwalk_flex"):
            if impl == "sketchwalk_flex":
                flexwalk.configure(model, cfg)
            else:
                model.set_attn_implementation("sdpa")
            flexwalk.reset_counters()
            with torch.no_grad():
                if cache_kind == "static":
                    cache = transformers.StaticCache(config=model.config, max_cache_len=ctx + steps + 16)
                else:
                    cache = transformers.DynamicCache(config=model.config)
                if impl == "sketchwalk_flex":  # warm-up: compile this length's kernels outside the timing
                    warm = transformers.StaticCache(config=model.config, max_cache_len=ctx + 8)
                    model(ids, **cache_kwargs(warm), use_cache=True, logits_to_keep=1)
                    del warm
                torch.cuda.synchronize()
                t0 = time.time()
                logits = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits
                torch.cuda.synchronize()
                ttft = time.time() - t0
                tok = logits[:, -1:].argmax(-1)
                pos = ctx
                times = []
                for i in range(steps):
                    torch.cuda.synchronize()
                    t0 = time.time()
                    logits = model(tok, **cache_kwargs(cache), use_cache=True,
                                   position_ids=torch.tensor([[pos]], device="cuda")).logits
                    tok = logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append(time.time() - t0)
                    pos += 1
            steady = sorted(times[4:])[len(times[4:]) // 2]
            r = dict(ttft_s=ttft, decode_ms_median=steady * 1e3, tokens_per_s=1.0 / steady,
                     counters=flexwalk.counters(), peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            out[f"{ctx}/{cache_kind}/{impl}"] = r
            log(f"{ctx} {cache_kind:>7} {impl:>15}: TTFT {ttft:.2f} s, decode {steady * 1e3:.2f} ms/token "
                f"({1 / steady:.1f} tok/s), counters {r['counters']}")
            del cache
            torch.cuda.empty_cache()
        a, b = out.get(f"{ctx}/{cache_kind}/sdpa"), out.get(f"{ctx}/{cache_kind}/sketchwalk_flex")
        if a and b:
            sp = a["decode_ms_median"] / b["decode_ms_median"]
            out[f"{ctx}/{cache_kind}/decode_speedup"] = sp
            log(f"{ctx} {cache_kind}: decode speedup sketchwalk/sdpa x{sp:.2f}, TTFT x{a['ttft_s'] / b['ttft_s']:.2f}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    args = ap.parse_args()
    import transformers
    import triton

    RESULTS["env"] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                          transformers=transformers.__version__, python=platform.python_version())
    log(RESULTS["env"])
    skip = set(filter(None, args.skip.split(",")))
    if "correctness" not in skip:
        correctness()
    if "tune" not in skip:
        triton_tune()
    if "attention" not in skip:
        decode_attention(args.quick)
    if "profile" not in skip:
        step_profile()
    if "scoring" not in skip:
        scoring_cost()
    if "e2e" not in skip:
        end_to_end(args.quick)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_decode.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
