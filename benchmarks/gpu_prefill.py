"""GPU prefill benchmark (issue 5): one script, one device call.

    PYTHONPATH=. python benchmarks/gpu_prefill.py --out DIR [--lengths 4096,...] [--skip grid,ttft]

1. grid: one attention layer, Llama-3.1-8B attention shape (32 query / 8 KV heads, head dim
   128), bf16, lengths x density 10/20/30% x batch 1/4: SDPA flash and cuDNN, dense flex
   (causal BlockMask), the fused selection + mask, the sparse flex attention with that mask
   (full mask_mod; and as `sketchwalk_attention` runs it: kernel mask_mod, tiles, safe rows),
   the total (`sketchwalk_attention`), peak memory of the total vs SDPA's; block 128, or the
   blocks of --grid-blocks (block_spec: 128, 64, q128kv64 = 64-token key blocks chosen per
   128-row kernel query block).
2. ttft: time to first token of a Llama-3.1-8B-shaped random-weight model, sketchwalk_flex vs
   sdpa (logits of the last position only), after a warm-up of each length.
3. recompiles: ten prompt lengths after warm-up, new compiled graphs (dynamo counter).
Writes DIR/gpu_prefill.json and prints tables.  Medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexwalk
from flexwalk import prefill
from flexwalk.kernels import flex as flexwalk_flex
from flexwalk import SketchWalkConfig, fa4_prefill, sketchwalk_attention, triton_prefill
from flexwalk.kernels.flex import compiled_flex, flex, flex_kernel_options, row_bounds
from flexwalk.selection.driver import fused_selection, fused_selection_mask
from flexwalk.kernels.flex import dense_block_mask, kernel_mask_mod

RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


def block_spec(spec: str) -> dict:
    """'128' -> block_size 128; 'q128kv64' -> query_block_size 128 over key blocks of 64."""
    spec = spec.strip()
    if spec.startswith("q") and "kv" in spec:
        q, kv = spec[1:].split("kv")
        return {"block_size": int(kv), "query_block_size": int(q)}
    return {"block_size": int(spec)}


def block_specs(arg: str) -> list[str]:
    """A comma-separated --blocks value, each entry checked (a bad one fails before any GPU work)."""
    specs = [x.strip() for x in arg.split(",") if x.strip()]
    for spec in specs:
        try:
            SketchWalkConfig(**block_spec(spec))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{spec!r}: {e}") from e
    return specs


def bench(fn, long: bool = False) -> float:
    import triton.testing as tt

    # long: calls of 50-250 ms; 600 ms of repetitions gives several samples (30 ms gave one)
    return tt.do_bench(fn, warmup=25 if not long else 5, rep=100 if not long else 600, return_mode="median")


def env_info() -> dict:
    """Device and versions, recorded beside every GPU measurement (a CPU trial run records no device)."""
    import transformers

    env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version())
    if torch.cuda.is_available():
        import triton

        env.update(device=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(), triton=triton.__version__)
    return env


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def grid(lengths, batches, densities, budget_s, blocks=("128",)):
    rows = []
    t_end = time.time() + budget_s
    for bsz in batches:
        for n in lengths:
            if time.time() > t_end:
                log(f"skip B{bsz} n={n}: time budget")
                continue
            long = n * bsz >= 65536
            q, k, v = llama8b_qkv(n, batch=bsz)

            t_flash, t_cudnn = sdpa_times(q, k, v, long)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                mem_sdpa = peak_gib(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            best = min(t_flash, t_cudnn)
            dbm = dense_block_mask(bsz, n, n, 128, q.device)
            qp, kp, vp = (F.pad(x, (0, 0, 0, dbm.seq_lengths[0] - n)) for x in (q, k, v))
            t_dense_flex = bench(lambda: compiled_flex(qp, kp, vp, block_mask=dbm, enable_gqa=True), long)
            for density, spec in [(d, b) for d in densities for b in blocks]:
                cfg = SketchWalkConfig(**block_spec(spec), density=density, dense_layers=0, dense_below=0)
                sketchwalk_attention(q, k, v, cfg, 0)  # compile / warm
                # selection + mask as the layer builds them: the tables alone where FA4 or the Triton kernel
                # runs (they take them without a BlockMask), the BlockMask too where flex does
                kernel = prefill.prefill_kernel(q, k, v, cfg)
                sel_fn = fused_selection if kernel != "flex" else fused_selection_mask
                t_sel = bench(lambda: sel_fn(q, k, cfg, 0, None), long)
                tables, _, kept, causal = fused_selection(q, k, cfg, 0, None)
                bm = flexwalk_flex.tables_block_mask(tables, cfg, flexwalk_flex.bucket_length(n))  # of the same tables
                tiles = flex_kernel_options(cfg.block_size, q.device, dtype=q.dtype, head_dim=q.shape[-1], q_block=cfg.q_block)  # None for 128
                t_attn = bench(lambda: compiled_flex(qp, kp, vp, block_mask=bm, enable_gqa=True, kernel_options=tiles),
                               long)
                fast = kernel_mask_mod()
                t_kernel = bench(lambda: flex(q, k, v, bm, block_size=cfg.block_size, q_block=cfg.q_block,
                                              kernel_mask_mod=fast), long)
                t_triton = float("nan")  # flexwalk's Triton kernel on the same tables (triton_prefill)
                if triton_prefill.supported(q, q_block=cfg.q_block, kv_block=cfg.block_size):
                    se = row_bounds(bsz, n, None, q.device)
                    t_triton = bench(lambda: triton_prefill.block_mask_attention(q, k, v, bm, *se), long)
                t_fa4 = float("nan")  # FlashAttention 4 on the same tables (fa4_prefill), where installed
                if fa4_prefill.supported(q, k, q_block=cfg.q_block, kv_block=cfg.block_size):
                    p_cnt, p_idx, f_cnt, f_idx = tables[:4]
                    t_fa4 = bench(lambda: fa4_prefill.sparse_prefill_attention(
                        q, k, v, f_cnt, f_idx, p_cnt, p_idx, q_block=cfg.q_block, kv_block=cfg.block_size), long)
                t_total = bench(lambda: sketchwalk_attention(q, k, v, cfg, 0), long)
                mem = peak_gib(lambda: sketchwalk_attention(q, k, v, cfg, 0))
                r = dict(batch=bsz, n=n, density=density, blocks=spec, block_size=cfg.block_size,
                         query_block_size=cfg.q_block, achieved=float(kept.sum() / causal.sum()),
                         sdpa_flash_ms=t_flash, sdpa_cudnn_ms=t_cudnn, dense_flex_ms=t_dense_flex,
                         select_mask_ms=t_sel, sparse_attention_ms=t_attn, sparse_attention_kernel_ms=t_kernel,
                         sparse_attention_triton_ms=t_triton, sparse_attention_fa4_ms=t_fa4, prefill_kernel=kernel,
                         total_ms=t_total, speedup_vs_best_sdpa=best / t_total,
                         speedup_vs_cudnn=t_cudnn / t_total, select_share=t_sel / t_total,
                         peak_gib=mem, sdpa_peak_gib=mem_sdpa, peak_ratio=mem / max(mem_sdpa, 1e-9))
                rows.append(r)
                log(f"B{bsz} {n:>6} d{density:.1f} {spec:>8} (got {r['achieved']:.3f}): flash {t_flash:.3f} cudnn "
                    f"{t_cudnn:.3f} flexdense {t_dense_flex:.3f} | sel+mask {t_sel:.3f} attn {t_attn:.3f} (kernel "
                    f"mask {t_kernel:.3f}, triton {t_triton:.3f}, fa4 {t_fa4:.3f}; {kernel} runs) total {t_total:.3f} ms -> x{best / t_total:.2f} (sel "
                    f"{100 * t_sel / t_total:.0f}%) | peak {mem:.2f} vs {mem_sdpa:.2f} GiB")
            del q, k, v, qp, kp, vp
            torch.cuda.empty_cache()
    return rows


def _triton_compiled() -> int:
    """Kernels Triton has compiled so far for flexwalk's JIT functions (all devices)."""
    from triton.runtime.jit import JITFunction

    from flexwalk.kernels import residual, triton_decode, triton_prefill, triton_selection

    total = 0
    for mod in (triton_prefill, residual, triton_selection, triton_decode):
        for fn in vars(mod).values():
            if isinstance(fn, JITFunction):
                total += sum(len(c[0]) for c in fn.device_caches.values())
    return total


def _fa4_compiled() -> int:
    """Kernels FlashAttention 4 has compiled so far (0 where it is not installed)."""
    if not fa4_prefill.available():
        return 0
    from flash_attn.cute import interface

    return len(getattr(interface._flash_attn_fwd.compile_cache, "cache", ()))


def recompiles():
    """Ten prompt lengths in one bucket after warm-up, for each prefill kernel with and without
    the residual: new dynamo graphs and new Triton kernels (both must be 0)."""
    from torch._dynamo.utils import counters

    lengths = [4100, 4300, 4352, 4500, 4700, 4900, 5000, 5100, 5120, 4600]  # one flex bucket (5120)
    out = {"lengths": lengths}
    try:
        for kernel in ("fa4", "triton", "flex") if fa4_prefill.available() else ("triton", "flex"):
            for residual in (False,) if kernel == "fa4" else (False, True):  # fa4 does not take the residual
                cfg = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0, residual=residual)
                flexwalk.options.set_options(prefill_kernel=kernel)
                flexwalk.reset_counters()

                def run(n):
                    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
                    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
                    v = torch.randn_like(k)  # not k itself: flex guards on key/value aliasing
                    with torch.no_grad():
                        st = None
                        for layer in range(2):  # the second layer carries the walk
                            _, st = sketchwalk_attention(q, k, v, cfg, layer, st)

                for n in (4097, 4500, 4224):
                    run(n)
                graphs, kernels, fa4_kernels = counters["stats"]["unique_graphs"], _triton_compiled(), _fa4_compiled()
                for n in lengths:
                    run(n)
                torch.cuda.synchronize()
                name = f"{kernel}{'+residual' if residual else ''}"
                total_graphs, total_kernels = counters["stats"]["unique_graphs"], _triton_compiled()
                out[name] = {"new_graphs": total_graphs - graphs, "new_triton_kernels": total_kernels - kernels,
                             "triton_kernels": total_kernels, "graphs": total_graphs,
                             "new_fa4_kernels": _fa4_compiled() - fa4_kernels, "counters": flexwalk.counters()}
                log(f"{name}: ten lengths in one bucket after warm-up: {out[name]['new_graphs']} new compiled graphs "
                    f"(of {total_graphs}), {out[name]['new_triton_kernels']} new Triton kernels (of {total_kernels}), "
                    f"{out[name]['new_fa4_kernels']} new FA4 kernels; {out[name]['counters']}")
    finally:
        flexwalk.options.set_options(prefill_kernel="auto")
    out["new_graphs"] = sum(v["new_graphs"] for k, v in out.items() if isinstance(v, dict))
    return out


def _prompt(n: int, vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, min(vocab, 128000), (1, n), generator=g).to(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def time_prompts(model, lengths, sw: SketchWalkConfig, reps: int, rank0: bool = True, group=None, warmup: int = 0):
    """TTFT per length and method, sdpa then sketchwalk_flex: `warmup` untimed forwards, then
    `reps` timed ones (with no warm-up the first compiles what is new); the minimum counts.

    Returns ({"n/impl": record, "n/speedup": ...}, {"n/impl": last-position logits}).  Under a
    tensor-parallel `group` every rank runs it (a barrier before each forward) and the records
    say whether all ranks kept the same density per layer; `rank0` prints."""
    device = model.device
    out, logits = {}, {}
    for n in lengths:
        ids = _prompt(n, model.config.vocab_size, device)
        for impl in ("sdpa", "sketchwalk_flex"):
            if impl == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                flexwalk.configure(model, sw)
            times = []
            with torch.no_grad():
                for _ in range(warmup):
                    model(ids, use_cache=False, logits_to_keep=1)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                for _ in range(reps):
                    flexwalk.reset_counters()
                    if group is not None:
                        dist.barrier()
                    _sync(device)
                    t0 = time.perf_counter()
                    lg = model(ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
                    _sync(device)
                    times.append(time.perf_counter() - t0)
            rec = dict(ttft_s=min(times), times_s=times, peak_gib=_peak_gib(device))
            if impl == "sketchwalk_flex":
                dens = flexwalk.density_report("prefill")
                rec["density_per_layer"] = {str(k): v for k, v in dens.items()}
                rec["sparse_prefill_calls"] = flexwalk.counters().get("sparse_prefill", 0)
                if group is not None:  # every rank must have kept exactly the same blocks
                    every = [None] * dist.get_world_size()
                    dist.all_gather_object(every, rec["density_per_layer"])
                    rec["ranks_agree"] = all(e == every[0] for e in every)
            out[f"{n}/{impl}"] = rec
            logits[f"{n}/{impl}"] = lg.cpu()
            if rank0:
                extra = f", ranks agree: {rec['ranks_agree']}" if "ranks_agree" in rec else ""
                print(f"TTFT {n:>6} {impl:>15}: {min(times):.3f} s (runs {', '.join(f'{t:.3f}' for t in times)}), "
                      f"peak {rec['peak_gib']:.1f} GiB{extra}", flush=True)
        out[f"{n}/speedup"] = out[f"{n}/sdpa"]["ttft_s"] / out[f"{n}/sketchwalk_flex"]["ttft_s"]
        if rank0:
            print(f"TTFT {n}: x{out[f'{n}/speedup']:.2f}", flush=True)
    model.set_attn_implementation("sdpa")
    return out, logits


def ttft(lengths, dense_below=8192, model_name=None, preset=None, overrides=None):
    """TTFT of the 8B-shaped random model, or of `model_name` (a packaged model or directory,
    loaded by flexwalk.models.load_model) with the SketchWalk `preset` when given, and the
    fields of `overrides` (a dict) changed."""
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a trial run of the script only
    torch.manual_seed(0)
    if model_name is None:
        from gpu_decode import _llama8b_config  # the same 8B-shaped model as the decode benchmark

        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(_llama8b_config(), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa").eval()
    else:
        from flexwalk.models import load_model

        model, _ = load_model(model_name, attn_implementation="sdpa", device=dev, dtype="bfloat16" if dev == "cuda" else "float32")
    sw = (SketchWalkConfig.preset(preset) if preset else SketchWalkConfig(block_size=128, density=0.2)).replace(
        dense_below=dense_below, **(overrides or {}))
    out = {"model": model_name or "llama-3.1-8b-shaped (random)", "config": sw.to_dict()}
    res, _ = time_prompts(model, lengths, sw, reps=2, warmup=1)  # one warm-up forward per length and method
    out.update(res)
    for n in lengths:
        a, b = out[f"{n}/sdpa"], out[f"{n}/sketchwalk_flex"]
        log(f"TTFT {n}: peak x{b['peak_gib'] / a['peak_gib']:.3f}")
    return out


def llama8b_qkv(n: int, device="cuda", batch: int = 1):
    """Random q, k, v of one Llama-3.1-8B attention layer (32 / 8 heads, head dim 128), bf16."""
    g = torch.Generator(device=device).manual_seed(n)
    return tuple(torch.randn(batch, h, n, 128, device=device, generator=g, dtype=torch.bfloat16) for h in (32, 8, 8))


def sdpa_ms(q, k, v, backend: SDPBackend, long: bool = False) -> float:
    """Time of causal SDPA with GQA on q, k, v under one backend, ms."""
    with sdpa_kernel(backend):
        return bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), long)


def sdpa_times(q, k, v, long: bool = False) -> tuple[float, float]:
    """(flash, cuDNN) times of causal SDPA with GQA on q, k, v, ms."""
    return sdpa_ms(q, k, v, SDPBackend.FLASH_ATTENTION, long), sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, long)


def run_sections(sections, results: dict, path: str) -> None:
    """Run (name, fn, args) sections in order into results[name], writing results to path (JSON)
    after each; a section that raises is recorded as {"error": ...} and the next one runs."""
    for name, fn, a in sections:
        t = time.time()
        try:
            results[name] = fn(*a)
        except Exception as e:  # one broken section must not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        log(f"({name}: {time.time() - t:.0f} s)")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--densities", default="0.1,0.2,0.3")
    ap.add_argument("--ttft-lengths", default="8192,32768,65536,131072")
    ap.add_argument("--grid-budget-s", type=float, default=300)
    ap.add_argument("--ttft-dense-below", type=int, default=8192, help="sketchwalk_flex dense_below in the TTFT runs")
    ap.add_argument("--ttft-model", default=None, help="packaged model name or directory (default: the 8B-shaped random model)")
    ap.add_argument("--ttft-preset", default=None, help="SketchWalk preset of the TTFT runs (default: block 128, density 0.2)")
    ap.add_argument("--ttft-config", type=json.loads, default=None,
                    help="JSON fields over the TTFT config, e.g. '{\"block_size\": 64, \"query_block_size\": 128}'")
    ap.add_argument("--grid-blocks", type=block_specs, default="128",
                    help="block configurations of the grid, comma-separated: 128, 64, q128kv64 (query_block_size "
                         "128 over 64-token key blocks) (default: %(default)s)")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    RESULTS["env"] = env_info()
    log(RESULTS["env"])
    skip = set(filter(None, args.skip.split(",")))
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    sections = [("recompiles", recompiles, ()),
                ("grid", grid, (ints(args.lengths), ints(args.batches), [float(x) for x in args.densities.split(",")],
                                args.grid_budget_s, args.grid_blocks)),
                ("ttft", ttft, (ints(args.ttft_lengths), args.ttft_dense_below, args.ttft_model, args.ttft_preset,
                                args.ttft_config))]
    run_sections([x for x in sections if x[0] not in skip], RESULTS, os.path.join(args.out, "gpu_prefill.json"))

if __name__ == "__main__":
    main()
