"""One GPU session: correctness of the CUDA path against the eager oracle, then timings.

    python benchmarks/gpu_check.py --out $OUT      # needs a CUDA GPU

Part 1 (correctness): sketchwalk_attention vs the eager oracle (same selection -> dense token
mask -> SDPA) and full budget vs dense SDPA, in bf16 / fp32, block 64 / 128, GQA 32/8, with
padding; a tiny random-weight Llama generating with sketchwalk_flex vs sdpa.
Part 2 (timings): one attention layer of the Llama-3.1-8B shape (32 q heads, 8 kv heads, head
dim 128, bf16, batch 1): SDPA (default backend) vs SketchWalk total, selection and mask alone.
Part 3 (recompiles): ten prompt lengths after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexwalk  # noqa: E402
from flexwalk import SketchWalkConfig, eager_sketchwalk_attention, sketchwalk_attention, token_mask  # noqa: E402
from flexwalk.kernels.flex import selection_block_mask  # noqa: E402
from flexwalk.reference import reference_attention  # noqa: E402


def log(*a):
    print(*a, flush=True)


def err_budget(q, k, v, mask, out):
    ref_lp = reference_attention(q, k, v, mask)
    ref_hp = reference_attention(q.double(), k.double(), v.double(), mask)
    e_ref = (ref_lp.double() - ref_hp).abs().max().item()
    e_out = (out.double() - ref_hp).abs().max().item()
    return e_out, 2 * e_ref + 4 * torch.finfo(q.dtype).eps


def correctness(results):
    dev = "cuda"
    for dtype in (torch.bfloat16, torch.float32):
        for bs in (64, 128):
            n = 2000 + 37
            g = torch.Generator(device=dev).manual_seed(bs)
            q = torch.randn(2, 32, n, 128, device=dev, generator=g).to(dtype)
            k = torch.randn(2, 8, n, 128, device=dev, generator=g).to(dtype)
            v = torch.randn(2, 8, n, 128, device=dev, generator=g).to(dtype)
            kv = torch.ones(2, n, dtype=torch.bool, device=dev)
            kv[1, :3 * bs + 5] = False
            cfg = SketchWalkConfig(block_size=bs, density=0.2, dense_layers=0, dense_below=0)
            st_f = st_o = None
            for layer in range(2):
                out, st_f = sketchwalk_attention(q, k, v, cfg, layer, st_f, key_valid=kv)
                ref, st_o, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, st_o, key_valid=kv)
                mask = token_mask(n, selection=sel, key_valid=kv)
                rows = kv[1]
                e, allowed = err_budget(q[..., rows, :], k, v, mask[..., rows, :], out[..., rows, :])
                # compiled (CUDA) and eager reductions differ in order: walks agree to fp32 rounding
                same_sel = torch.allclose(st_f.transition, st_o.transition, rtol=0, atol=1e-6)
                ok = e <= allowed and same_sel and bool(torch.isfinite(out).all())
                results.append(dict(check="oracle", dtype=str(dtype), bs=bs, layer=layer, err=e, budget=allowed, ok=ok,
                                    density=sel.density()))
                log(f"oracle {dtype} bs={bs} layer={layer} err={e:.2e} budget={allowed:.2e} density={sel.density():.3f} ok={ok}")
            full = cfg.replace(density=1.0)
            out, _ = sketchwalk_attention(q, k, v, full, 0)
            e, allowed = err_budget(q, k, v, token_mask(n, batch=2, device=dev), out)
            results.append(dict(check="full_vs_sdpa", dtype=str(dtype), bs=bs, err=e, budget=allowed, ok=e <= allowed))
            log(f"full budget vs dense {dtype} bs={bs} err={e:.2e} budget={allowed:.2e} ok={e <= allowed}")

    from transformers import AutoModelForCausalLM, LlamaConfig

    c = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(c, attn_implementation="sdpa").to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 3000), device=dev)
    am = torch.ones_like(ids)
    am[1, :128] = 0
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
        flexwalk.configure(m, SketchWalkConfig(density=1.0, dense_below=0, dense_layers=1))
        flexwalk.reset_counters()
        got = m.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
    same = torch.equal(ref, got)
    results.append(dict(check="generate_full_budget", same_tokens=same, counters=flexwalk.counters()))
    log(f"tiny llama bf16 generate, full budget: same tokens as sdpa = {same}; counters {flexwalk.counters()}")


def timings(results, lengths, budget_s):
    import triton.testing as tt

    dev = "cuda"
    t_end = time.time() + budget_s
    for n in lengths:
        if time.time() > t_end:
            log(f"skip n={n}: time budget")
            break
        g = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(1, 32, n, 128, device=dev, generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, 8, n, 128, device=dev, generator=g, dtype=torch.bfloat16)
        v = torch.randn(1, 8, n, 128, device=dev, generator=g, dtype=torch.bfloat16)
        sdpa = tt.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                           warmup=50, rep=200, return_mode="median")
        row = dict(n=n, sdpa_ms=sdpa)
        for bs in (128, 64):
            cfg = SketchWalkConfig(block_size=bs, density=0.2, dense_layers=0, dense_below=0)
            sketchwalk_attention(q, k, v, cfg, 0)
            torch.cuda.synchronize()
            tot = tt.do_bench(lambda: sketchwalk_attention(q, k, v, cfg, 0), warmup=50, rep=200, return_mode="median")
            sel_t = tt.do_bench(lambda: flexwalk.sketchwalk_selection(q, k, cfg, 0), warmup=20, rep=100,
                                return_mode="median")
            sel, _ = flexwalk.sketchwalk_selection(q, k, cfg, 0)
            mask_t = tt.do_bench(lambda: selection_block_mask(sel), warmup=20, rep=100, return_mode="median")
            row.update({f"bs{bs}_total_ms": tot, f"bs{bs}_select_ms": sel_t, f"bs{bs}_mask_ms": mask_t,
                        f"bs{bs}_density": sel.density(), f"bs{bs}_speedup": sdpa / tot})
        results.append(dict(check="timing", **row))
        log(json.dumps(row))


def recompiles(results):
    from torch._dynamo.utils import counters

    dev = "cuda"
    cfg = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0)
    lengths = [4100, 4300, 4500, 4700, 4900, 5000, 5100, 5120, 4200, 4600]  # one bucket (5120)

    def run(n):
        q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
        sketchwalk_attention(q, k, k, cfg, 0)

    run(4097)
    before = counters["stats"]["unique_graphs"]
    for n in lengths:
        run(n)
    torch.cuda.synchronize()
    after = counters["stats"]["unique_graphs"]
    results.append(dict(check="recompiles", lengths=lengths, new_graphs=after - before))
    log(f"ten lengths in one bucket after warm-up: {after - before} new compiled graphs")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--timing-budget-s", type=float, default=240)
    args = ap.parse_args()
    import transformers

    results = []
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__)
    log(json.dumps(info))
    t0 = time.time()
    correctness(results)
    log(f"correctness done in {time.time() - t0:.0f}s")
    recompiles(results)
    timings(results, [int(x) for x in args.lengths.split(",")], args.timing_budget_s)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(dict(info=info, results=results), f, indent=1, default=str)
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
