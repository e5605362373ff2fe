"""GPU check and benchmark of the CUDA-graphed prefill selection (issue 5): one device call.

    PYTHONPATH=. python benchmarks/gpu_selection.py --out DIR [--sections check,speed,cold] [--blocks 128,64,q128kv64]

1. check: graph path == compiled path (flexwalk.options.Options.graph_selection on / off): the same
   BlockMask tables, walk and attention output, over three layers with the walk carried, batch
   2 with left padding, lengths off the bucket grid, head dims 64 and 128, bf16, blocks 128,
   64 and q128kv64 (128-row query blocks over 64-token key blocks); and, without padding, the
   attention with the kernel's cheap mask_mod (block_mask.kernel_mask_mod, with
   ROWS_GUARANTEED_SAFE) against the BlockMask's full one.
2. speed: one layer of the Llama-3.1-8B attention shape (32 / 8 heads, head dim 128, bf16,
   20% density, batch 1), per block configuration of --blocks (default 128; 64; q128kv64 =
   query_block_size 128 over block_size 64): selection + mask and total
   (`sketchwalk_attention`) with the graph and with the compiled selection, against SDPA
   (best of flash and cuDNN); the attention alone with the kernel mask_mod and with the full one.
3. tail: what the kernel's schedule costs.  At each length, the attention alone (kernel
   mask_mod) with the selection of dense_tail_blocks 1 (the default: the last query block keeps
   every key block) and 0, and with random selections of the same per-row block counts (sink
   and diagonal forced).  flex launches a query block's programs in ascending order, so the last
   programs to start are the longest rows; a dense last row makes the longest program of all.
4. cold: first and second forward of a SmolLM2-135M-shaped random-weight model (30 layers,
   9 / 3 heads, head dim 64) at 8K tokens in fresh processes with an empty inductor cache,
   graph selection on and off: what a user waits for before the first prompt returns.
Writes DIR/gpu_selection.json.  Medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import flexwalk
from torch.nn.attention import SDPBackend

from flexwalk import SketchWalkConfig, sketchwalk_attention
from flexwalk.kernels.flex import flex
from flexwalk.selection.driver import fused_selection_mask
from flexwalk.kernels.flex import block_mask_from_tables, kernel_mask_mod
from gpu_prefill import bench, block_spec, block_specs, env_info, llama8b_qkv, log, sdpa_ms, sdpa_times  # this folder is on sys.path as a script


CHECK_CASES = {"128": (128, 32, 8, 128, None), "64": (64, 9, 3, 64, None), "q128kv64": (128, 32, 8, 64, 128)}


def check(blocks=tuple(CHECK_CASES)):
    rows = []
    for d, hq, hkv, bs, qbs in (CHECK_CASES[b] for b in blocks):
        for n in (3000, 8000, 20000):
            cfg = SketchWalkConfig(block_size=bs, density=0.2, dense_layers=0, dense_below=0, dense_tail_blocks=2,
                                   query_block_size=qbs)
            g = torch.Generator(device="cuda").manual_seed(n)
            q = torch.randn(2, hq, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
            k = torch.randn(2, hkv, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
            v = torch.randn(2, hkv, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
            kv = torch.ones(2, n, dtype=torch.bool, device="cuda")
            kv[1, : n // 7] = False
            res = {}
            for mode in (True, False):
                flexwalk.options.set_options(graph_selection=mode)
                st, outs, walks, tables = None, [], [], []
                for layer in range(3):
                    bm, _, _, _ = fused_selection_mask(q, k, cfg, layer, st, key_valid=kv)
                    tables.append((bm.kv_num_blocks.clone(), bm.full_kv_num_blocks.clone()))
                    out, st = sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=kv)
                    outs.append(out)
                    walks.append(st.transition)
                res[mode] = (outs, walks, tables)
            flexwalk.options.set_options(graph_selection=True)
            real = kv[:, None, :, None]
            out_err = max(float(((a - b) * real).abs().max()) for a, b in zip(res[True][0], res[False][0]))
            nb = -(-n // bs)
            walk_err = max(float((a[:, :nb, :nb] - b).abs().max()) for a, b in zip(res[True][1], res[False][1]))
            tables_equal = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                               for a, b in zip(res[True][2], res[False][2]))
            # no padding: the kernel mask_mod + ROWS_GUARANTEED_SAFE against the full mask_mod
            bm, _, _, _ = fused_selection_mask(q, k, cfg, 0, None)
            a = flex(q, k, v, bm, block_size=bs, q_block=cfg.q_block, kernel_mask_mod=kernel_mask_mod())
            b = flex(q, k, v, bm, block_size=bs, q_block=cfg.q_block)
            kernel_mask_err = float((a[:, :, :n].float() - b[:, :, :n].float()).abs().max())
            r = dict(d=d, n=n, block_size=bs, query_block_size=cfg.q_block, out_max_abs_diff=out_err,
                     walk_max_abs_diff=walk_err, tables_equal=tables_equal, kernel_mask_max_abs_diff=kernel_mask_err,
                     kernel_mask_finite=bool(torch.isfinite(a[:, :, :n]).all()))
            rows.append(r)
            log(f"check d{d} q{cfg.q_block}kv{bs} n={n}: tables equal {tables_equal}, out diff {out_err:.2e}, walk "
                f"diff {walk_err:.2e}, kernel mask diff {kernel_mask_err:.2e} finite {r['kernel_mask_finite']}")
    return rows


MODES = {"graph": (True, False), "graph_compiled": (True, True), "compiled": (False, False)}


def speed(lengths, blocks=("128",), modes=tuple(MODES)):
    rows = []
    for n in lengths:
        long = n >= 65536
        q, k, v = llama8b_qkv(n)
        t_flash, t_cudnn = sdpa_times(q, k, v, long)
        for spec in blocks:
            rows.append(_speed_row(q, k, v, n, long, spec, t_flash, t_cudnn, modes))
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _speed_row(q, k, v, n, long, spec, t_flash, t_cudnn, modes=tuple(MODES)):
    """`speed` of one block configuration (block_spec) at one length."""
    best = min(t_flash, t_cudnn)
    cfg = SketchWalkConfig(**block_spec(spec), density=0.2, dense_layers=0, dense_below=0)
    r = dict(n=n, blocks=spec, block_size=cfg.block_size, query_block_size=cfg.q_block, sdpa_flash_ms=t_flash,
             sdpa_cudnn_ms=t_cudnn)
    # graph: the eager selection captured in a CUDA graph (the default); graph_compiled: the
    # inductor-compiled one captured (Options.compile_graphed_selection); compiled: no graph, the
    # selection compiled with a dynamic length
    for tag in modes:
        graph, comp = MODES[tag]
        flexwalk.options.set_options(graph_selection=graph, compile_graphed_selection=comp)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sketchwalk_attention(q, k, v, cfg, 0)  # compiles (capture) what is new for this length
        torch.cuda.synchronize()
        r[f"{tag}_first_call_s"] = time.perf_counter() - t0
        t_sel = bench(lambda: fused_selection_mask(q, k, cfg, 0, None), long)
        t_total = bench(lambda: sketchwalk_attention(q, k, v, cfg, 0), long)
        r.update({f"{tag}_select_mask_ms": t_sel, f"{tag}_total_ms": t_total,
                  f"{tag}_speedup_vs_best_sdpa": best / t_total, f"{tag}_speedup_vs_cudnn": t_cudnn / t_total,
                  f"{tag}_select_share": t_sel / t_total})
        log(f"{n:>6} {spec:>8} {tag:>11}: first call {r[f'{tag}_first_call_s']:.1f} s, sel+mask {t_sel:.3f} total "
            f"{t_total:.3f} ms | flash {t_flash:.3f} cudnn {t_cudnn:.3f} -> x{best / t_total:.2f} "
            f"(sel {100 * t_sel / t_total:.0f}%)")
    # the attention alone: the kernel's cheap mask_mod + ROWS_GUARANTEED_SAFE (what
    # sketchwalk_attention runs) against the BlockMask's full mask_mod
    bm, _, _, _ = fused_selection_mask(q, k, cfg, 0, None)
    fast = kernel_mask_mod()
    tiles = dict(block_size=cfg.block_size, q_block=cfg.q_block)
    r["attention_kernel_mask_ms"] = bench(lambda: flex(q, k, v, bm, kernel_mask_mod=fast, **tiles), long)
    r["attention_full_mask_ms"] = bench(lambda: flex(q, k, v, bm, **tiles), long)
    log(f"{n:>6} {spec:>8} attention: kernel mask {r['attention_kernel_mask_ms']:.3f} ms, full mask "
        f"{r['attention_full_mask_ms']:.3f} ms")
    flexwalk.options.set_options(graph_selection=True, compile_graphed_selection=False)
    return r


def _random_like(bm, n, bs, seed):
    """A BlockMask with the per-row block counts of `bm` (partial + full), blocks drawn at
    random among each row's causal blocks, sink (block 0) and diagonal forced, ascending order."""
    nq = n // bs
    counts = (bm.kv_num_blocks + bm.full_kv_num_blocks)[0, 0, :nq]
    g = torch.Generator(device="cuda").manual_seed(seed)
    score = torch.rand(nq, nq, device="cuda", generator=g)
    i = torch.arange(nq, device="cuda")
    causal = i[None, :] <= i[:, None]
    score = score.masked_fill(~causal, -1.0)
    score[:, 0] = 2.0
    score[i, i] = 3.0
    order = score.sort(-1, descending=True).indices
    keep = torch.zeros(nq, nq, dtype=torch.bool, device="cuda")
    keep.scatter_(1, order, torch.arange(nq, device="cuda")[None, :].expand(nq, nq) < counts[:, None])
    keep &= causal
    diag = torch.eye(nq, dtype=torch.bool, device="cuda")[None]
    mb = block_mask_from_tables(diag, keep[None] & ~diag, kernel_mask_mod(), bs, n, n)
    return mb, float(keep.sum() / causal.sum())


def tail(lengths):
    rows = []
    for n in lengths:
        long = n >= 65536
        q, k, v = llama8b_qkv(n)
        t_cudnn = sdpa_ms(q, k, v, SDPBackend.CUDNN_ATTENTION, long)
        r = dict(n=n, sdpa_cudnn_ms=t_cudnn)
        fast = kernel_mask_mod()
        nq = n // 128
        for tail_blocks in (1, 0):
            cfg = SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0,
                                   dense_tail_blocks=tail_blocks)
            bm, _, _, _ = fused_selection_mask(q, k, cfg, 0, None)
            counts = (bm.kv_num_blocks + bm.full_kv_num_blocks)[0, 0, :nq].float()
            dens = float(counts.sum() / (nq * (nq + 1) / 2))
            t = bench(lambda: flex(q, k, v, bm, kernel_mask_mod=fast, block_size=128), long)
            rm, rdens = _random_like(bm, n, 128, n + tail_blocks)
            t_rand = bench(lambda: flex(q, k, v, rm, kernel_mask_mod=fast, block_size=128), long)
            r[f"tail{tail_blocks}"] = dict(density=dens, attention_ms=t, random_density=rdens, random_attention_ms=t_rand,
                                           longest_row_blocks=int(counts.max()))
            if tail_blocks:
                # the whole layer with the dense tail inside the block-sparse kernel (as before) and
                # apart, on a side stream (Options.split_dense_tail, the default), and their outputs
                try:
                    for split in (False, True):  # True: split at every length (8K too)
                        flexwalk.options.set_options(split_dense_tail={True: "always", False: "never"}.get(split, split))
                        sketchwalk_attention(q, k, v, cfg, 0)
                        r[f"tail1_total_split_{split}_ms"] = bench(lambda: sketchwalk_attention(q, k, v, cfg, 0), long)
                        r[f"tail1_select_mask_split_{split}_ms"] = bench(
                            lambda: fused_selection_mask(q, k, cfg, 0, None), long)
                    a = flex(q, k, v, bm, kernel_mask_mod=fast, block_size=128)
                    b = sketchwalk_attention(q, k, v, cfg, 0)[0]
                finally:
                    flexwalk.options.set_options(split_dense_tail="cuda")
                r["tail1_split_max_abs_diff"] = float((a.float() - b.float()).abs().max())
                r["tail1_split_finite"] = bool(torch.isfinite(b).all())
                log(f"tail {n:>6} whole layer: tail inside {r['tail1_total_split_False_ms']:.3f} ms, apart "
                    f"{r['tail1_total_split_True_ms']:.3f} ms (x{t_cudnn / r['tail1_total_split_True_ms']:.2f} "
                    f"cudnn); outputs differ by {r['tail1_split_max_abs_diff']:.2e}, finite {r['tail1_split_finite']}")
            log(f"tail {n:>6} dense_tail_blocks={tail_blocks}: selection density {dens:.4f} attention {t:.3f} ms; "
                f"random same counts (density {rdens:.4f}) {t_rand:.3f} ms; cudnn {t_cudnn:.3f}")
        rows.append(r)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


COLD = r"""
import json, sys, time, torch, flexwalk
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM
flexwalk.options.set_options(graph_selection=sys.argv[1] == "on")
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
torch.manual_seed(0)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
m.set_attn_implementation("sketchwalk_flex")
ids = torch.randint(0, 49152, (1, 8064), device="cuda")
times, graphs = [], []
for i, n in enumerate((8064, 8064, 8000, 8000)):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.no_grad():
        m(ids[:, :n], logits_to_keep=1)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    graphs.append(counters["stats"]["unique_graphs"])  # compiled graphs so far
print("RESULT", json.dumps({"times": times, "compiled_graphs": graphs, "counters": flexwalk.counters()}))
"""


def cold(modes=("on", "off")):
    out = {}
    for mode in modes:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            t = time.time()
            p = subprocess.run([sys.executable, "-c", COLD, mode], env=env, capture_output=True, text=True, timeout=900)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
            if p.returncode or not line:
                log(f"cold {mode}: failed\n{p.stderr[-3000:]}")
                out[mode] = dict(error=p.stderr[-3000:])
                continue
            r = json.loads(line[0].split(" ", 1)[1])
            times = r["times"]
            out[mode] = dict(first_s=times[0], second_s=times[1], other_length_s=times[2],
                             other_length_again_s=times[3], wall_s=time.time() - t,
                             compiled_graphs=r["compiled_graphs"], counters=r["counters"])
            log(f"cold graph={mode}: first forward {times[0]:.1f} s, second {times[1]:.3f} s, "
                f"another length {times[2]:.3f} s, again {times[3]:.3f} s; compiled graphs after each "
                f"{r['compiled_graphs']}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="check,speed,cold")
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--cold-modes", default="on,off", help="graph selection on / off in the cold runs")
    ap.add_argument("--blocks", type=block_specs, default="128",
                    help="block configurations of the speed section, comma-separated: 128, 64, q128kv64 "
                         "(query_block_size 128 over 64-token key blocks) (default: %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="selection modes of the speed section: graph, graph_compiled, compiled (default: all)")
    ap.add_argument("--check-blocks", default=",".join(CHECK_CASES),
                    help="block configurations of the check section (default: all of 128, 64, q128kv64)")
    args = ap.parse_args()
    sections = args.sections.split(",")
    res = {"env": env_info()}
    log(res["env"])
    if "check" in sections:
        res["check"] = check(args.check_blocks.split(","))
    if "speed" in sections:
        res["speed"] = speed([int(x) for x in args.lengths.split(",")], args.blocks, args.modes.split(","))
    if "tail" in sections:
        res["tail"] = tail([int(x) for x in args.lengths.split(",")])
    if "cold" in sections:
        res["cold"] = cold(args.cold_modes.split(","))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_selection.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
