"""The GPU report: SketchWalk against dense attention on this machine, in one command.

    python -m benchmarks.report --out DIR [--quick] [--lengths 32768,131072] [--densities 0.2]
        [--batches 1] [--blocks 128,64] [--kernels auto,triton,flex] [--sections layer,varlen,padded,ttft,decode]

(`make bench-gpu BENCH_OUT=DIR BENCH_GPU_ARGS=--quick`.)  Sections:

- layer: one attention layer of the Llama-3.1-8B shape (32 / 8 heads, head dim 128, bf16), per
  batch, prompt length, block size, density and prefill kernel: `sketchwalk_attention` as a user
  calls it (selection + attention) against cuDNN SDPA, both timed in this process (medians of
  triton.testing.do_bench); before timing, the layer's output is checked against the eager oracle
  on its own selection and at full budget against dense attention (workload.check_layer).
- varlen / padded: the sequences of --varlen-lengths (mixed lengths, 2K-64K by default) packed in
  one batch (FlashAttention's layout, cu_seqlens) / left-padded into one batch (key_valid, as
  transformers batches prompts), against dense attention per sequence, and each sequence alone;
  one row per --scorings value and kernel.
- ttft: time to first token of a random-weight model of Llama-3.1-8B's shape (transformers
  LlamaConfig; --ttft-layers layers, all 32 by default), batch 1, logits of the last position:
  sdpa against sketchwalk_flex (block 128, density 0.2, dense_below 8192, the other fields'
  defaults; each --scorings value), each the fastest of --ttft-reps forwards after a warm-up.
- decode: the same model decoding with a static cache after a prompt of each --decode-lengths:
  tokens per second of sdpa and of sketchwalk_flex with sparse decode (skip_decode=False), the
  median of --decode-steps steps.

Writes DIR/report.json (device, versions, arguments and every measurement), DIR/report.md (the
tables) and, where matplotlib is installed, DIR/layer_speedup.png, DIR/ttft.png and DIR/decode.png,
after each section.  Exits with status 1 if a check failed or a section raised.  Without CUDA
the same code runs the small CPU shape (workload.SMALL) at the sizes given: a trial of the logic.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

import flexwalk
from benchmarks import workload
from flexwalk import SketchWalkConfig, sketchwalk_attention, sketchwalk_varlen_attention
from flexwalk.argtypes import comma_choices, density, non_negative_int, positive_int, token_lengths
from flexwalk.integrations.cache_kwarg import cache_kwargs
from flexwalk.kernels import fa4
from flexwalk.selection.driver import fused_selection

SECTIONS = ("layer", "varlen", "padded", "ttft", "decode")
SCORINGS = ("sketch", "bound")
FIGURES = {"layer": "layer_speedup.png", "ttft": "ttft.png", "decode": "decode.png"}
DEFAULTS = {  # per device; --quick changes some (QUICK)
    "cuda": dict(lengths=[8192, 32768, 65536, 131072], densities=[0.2], batches=[1], blocks=[128], kernels=None,
                 ttft_lengths=[8192, 32768, 65536, 131072], decode_lengths=[32768, 131072], ttft_layers=32,
                 ttft_reps=2, decode_steps=32, model_block=128, dense_below=8192,
                 varlen_lengths=[2048, 4096, 8192, 8192, 16384, 16384, 32768, 65536]),
    "cpu": dict(lengths=[1024, 2048], densities=[0.2], batches=[1], blocks=[64], kernels=None, ttft_lengths=[1024],
                decode_lengths=[1024], ttft_layers=4, ttft_reps=2, decode_steps=8, model_block=64, dense_below=0,
                varlen_lengths=[300, 1024, 700]),
}
QUICK = dict(lengths=[32768, 131072], blocks=[128, 64], kernels=["auto", "triton", "flex"],
             ttft_lengths=[32768, 131072], decode_lengths=[32768], ttft_reps=1, decode_steps=16)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints >= 1, got {text!r}")
    return values


def _blocks(text: str) -> list[int]:
    blocks = _ints(text)
    for b in blocks:
        try:
            SketchWalkConfig(block_size=b)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return blocks


def _densities(text: str) -> list[float]:
    return [density(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None, device: str | None = None) -> argparse.Namespace:
    """The arguments, every list filled in: what was given, else --quick's value, else the
    device's default (DEFAULTS)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory of report.json, report.md and the figures")
    ap.add_argument("--quick", action="store_true",
                    help=f"a short run: {', '.join(f'{k} {v}' for k, v in QUICK.items())}")
    ap.add_argument("--sections", type=comma_choices(SECTIONS, "--sections"), default=list(SECTIONS))
    ap.add_argument("--lengths", type=token_lengths, help="prompt lengths of the layer section")
    ap.add_argument("--densities", type=_densities)
    ap.add_argument("--batches", type=_ints)
    ap.add_argument("--blocks", type=_blocks, help="block sizes (SketchWalkConfig.block_size) of the layer section")
    ap.add_argument("--scorings", type=comma_choices(SCORINGS, "--scorings"), default=[SketchWalkConfig().prefill_scoring],
                    help="SketchWalkConfig.prefill_scoring values of the layer, varlen, padded and ttft sections, side by side "
                    "(default: the config's default)")
    ap.add_argument("--kernels", type=comma_choices(workload.PREFILL_KERNELS, "--kernels"),
                    help="prefill kernels of the layer section (default: those available, workload.kernels_for)")
    ap.add_argument("--varlen-lengths", type=token_lengths,
                    help="the sequences of the varlen and padded sections' one batch (packed in FlashAttention's layout, or left-padded)")
    ap.add_argument("--dense-below", type=non_negative_int,
                    help="SketchWalkConfig.dense_below of the varlen, padded, ttft and decode sections "
                    "(default: 8192 on CUDA, 0 on the CPU)")
    ap.add_argument("--ttft-lengths", type=token_lengths)
    ap.add_argument("--model", help="a packaged model name or local model directory that the ttft and decode "
                    "sections load (no tokenizer needed: the prompts are random token ids); default: a random-weight model of the 8B shape with --ttft-layers layers")
    ap.add_argument("--ttft-layers", type=positive_int, help="layers of the 8B-shaped model (ttft and decode)")
    ap.add_argument("--ttft-kernels", type=comma_choices(workload.PREFILL_KERNELS, "--ttft-kernels"), default=["auto"],
                    help="prefill kernels sketchwalk_flex runs in the ttft section")
    ap.add_argument("--ttft-reps", type=positive_int)
    ap.add_argument("--decode-lengths", type=token_lengths)
    ap.add_argument("--decode-steps", type=positive_int)
    args = ap.parse_args(argv)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = {**DEFAULTS[device], **(QUICK if args.quick else {})}
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.kernels is None:
        args.kernels = workload.kernels_for(device)
    args.device = device
    return args


def environment(device: str) -> dict:
    """Device and versions, recorded beside the measurements."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    fa4_version = version("flash-attn-4")
    if fa4_version is not None and not fa4.available():
        fa4_version += " (installed, does not import: not used)"
    env = dict(python=platform.python_version(), torch=torch.__version__, transformers=version("transformers"),
               triton=version("triton"), flash_attn_4=fa4_version, flexwalk=flexwalk.__version__,
               device="cpu", gpus=0, cuda=torch.version.cuda, cudnn=None)
    if device == "cuda":
        env.update(device=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version())
    return env


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections


@torch.no_grad()
def layer_section(args, record) -> None:
    """One row per (batch, length, block, density, prefill scoring, kernel), handed to `record` as it is measured."""
    device, shape = args.device, workload.shape_for(args.device)
    for batch in args.batches:
        for n in args.lengths:
            q, k, v = workload.qkv(shape, n, batch=batch, device=device)
            long = n * batch >= 65536
            dense_ms = workload.median_ms(lambda: workload.dense_attention(q, k, v), device, long=long)
            for block, density, scoring in itertools.product(args.blocks, args.densities, args.scorings):
                config = workload.layer_config(block, density, scoring)
                fused_selection(q, k, config, 0, None)  # the selection's compile and capture, untimed
                selection_ms = workload.median_ms(lambda: fused_selection(q, k, config, 0, None), device)
                for kernel in args.kernels:
                    row = dict(batch=batch, n=n, block_size=block, density=density, scoring=scoring, kernel=kernel,
                               dense=workload.dense_backend(device), dense_ms=dense_ms, selection_ms=selection_ms)
                    with flexwalk.options(prefill_kernel=kernel):
                        try:
                            check = workload.check_layer(q, k, v, config)
                            sparse_ms = workload.median_ms(lambda: sketchwalk_attention(q, k, v, config, 0),
                                                           device, long=long)
                        except Exception as e:  # one failing kernel must not hide the others
                            traceback.print_exc()
                            record({**row, "error": f"{type(e).__name__}: {e}"[:500]})
                            continue
                    record({**row, "ran": check["kernel"], "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                            "achieved_density": check["density"], "check": check})
            del q, k, v
            _free(device)


@torch.no_grad()
def varlen_section(args, record) -> None:
    """One packed batch of --varlen-lengths (block 128 on CUDA, density 0.2, dense_below as in
    the model sections: sequences shorter run dense) per kernel: `sketchwalk_varlen_attention` against dense
    varlen attention (torch's FlashAttention varlen where it runs, cuDNN SDPA per sequence), and
    each sequence alone (sparse and cuDNN) for the batch-1 ratio at the same tokens; the packed
    call timed with cu_seqlens on the device and on the host (no host sync).  The check: every
    sequence of the packed output equals its solo run within 4 ulps of its magnitude."""
    device, shape = args.device, workload.shape_for(args.device)
    lens = args.varlen_lengths
    seqs = [workload.qkv(shape, n, device=device, seed=i) for i, n in enumerate(lens)]
    q, k, v = (torch.cat([s[j][0].transpose(0, 1) for s in seqs]) for j in range(3))  # [total, H, D]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    cu_host = cu.cpu()  # as vLLM passes it: no host sync in the call
    total, long = sum(lens), True
    dense = {f"{workload.dense_backend(device)} per sequence": lambda: [workload.dense_attention(*s) for s in seqs]}
    varlen_dense = workload.dense_varlen(q, k, v, cu, max(lens))
    if varlen_dense is not None:
        dense["FlashAttention varlen (torch)"] = varlen_dense
    dense_ms = {name: workload.median_ms(fn, device, long=long) for name, fn in dense.items()}
    solo_dense_ms = sum(workload.median_ms(lambda s=s: workload.dense_attention(*s), device) for s in seqs)
    for scoring, kernel in itertools.product(args.scorings, args.kernels):
        config = batch_config(args, scoring)
        row = dict(lengths=lens, total=total, block_size=config.block_size, density=0.2,
                   dense_below=args.dense_below, scoring=scoring, kernel=kernel,
                   dense_ms=dense_ms, solo_dense_ms=solo_dense_ms)
        with flexwalk.options(prefill_kernel=kernel):
            try:
                flexwalk.reset_counters()
                out, _ = sketchwalk_varlen_attention(q, k, v, cu, max(lens), config, 0)
                counters = flexwalk.counters()
                err, budget = 0.0, 0.0
                for s, (a, b) in zip(seqs, itertools.pairwise(cu.tolist())):
                    solo, _ = sketchwalk_attention(*s, config, 0)
                    solo = solo[0].transpose(0, 1)
                    err = max(err, (out[a:b].float() - solo.float()).abs().max().item())
                    budget = max(budget, 4 * torch.finfo(q.dtype).eps * solo.float().abs().max().item())
                sparse_ms = workload.median_ms(lambda: sketchwalk_varlen_attention(q, k, v, cu, max(lens), config, 0),
                                               device, long=long)
                host_cu_ms = workload.median_ms(lambda: sketchwalk_varlen_attention(q, k, v, cu_host, max(lens), config,
                                                                                    0), device, long=long)
                solo_sparse_ms = sum(workload.median_ms(lambda s=s: sketchwalk_attention(*s, config, 0), device)
                                     for s in seqs)
            except Exception as e:  # one failing kernel must not hide the others
                traceback.print_exc()
                record({**row, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
        best_dense = min(dense_ms.values())
        ok = bool(torch.isfinite(out).all()) and err <= budget
        record({**row, "ran": workload.kernel_ran(counters), "sparse_ms": sparse_ms, "host_cu_sparse_ms": host_cu_ms,
                "solo_sparse_ms": solo_sparse_ms, "speedup": best_dense / sparse_ms,
                "solo_speedup": solo_dense_ms / solo_sparse_ms, "counters": counters,
                "check": dict(err=err, budget=budget, ok=ok)})
    _free(device)


@torch.no_grad()
def batch_config(args, scoring: str) -> SketchWalkConfig:
    """The varlen and padded sections' configuration: block --model-block, density 0.2, every layer
    sparse from --dense-below tokens, the given prefill scoring."""
    return SketchWalkConfig(block_size=args.model_block, density=0.2, dense_layers=0, dense_below=args.dense_below,
                            prefill_scoring=scoring)


def padded_section(args, record) -> None:
    """The sequences of --varlen-lengths left-padded into one [B, max length] batch (as
    transformers batches prompts; block 128 on CUDA, density 0.2, dense_below as in the varlen
    section, applied to the padded length): `sketchwalk_attention` with key_valid per kernel,
    against cuDNN SDPA run per sequence (a dense padded batch needs an n x n mask, which takes
    SDPA off its fused kernels), and each sequence alone for the batch-1 ratio at the same
    tokens.  Each length is rounded down to whole blocks, so that left padding keeps the blocks
    where a sequence alone has them.  The check: every row's real queries equal its solo run
    within 4 ulps of its magnitude (a row shorter than dense_below keeps every causal block in the
    batch and runs dense alone)."""
    device, shape = args.device, workload.shape_for(args.device)
    block = args.model_block
    lens = [max(block, n - n % block) for n in args.varlen_lengths]
    seqs = [workload.qkv(shape, n, device=device, seed=i) for i, n in enumerate(lens)]
    width = max(lens)
    q, k, v = (torch.zeros(len(lens), h, width, shape.head_dim, device=device, dtype=shape.dtype)
               for h in (shape.q_heads, shape.kv_heads, shape.kv_heads))
    key_valid = torch.zeros(len(lens), width, dtype=torch.bool, device=device)
    for row, (s, n) in enumerate(zip(seqs, lens)):
        for dst, src in zip((q, k, v), s):
            dst[row, :, width - n:] = src[0]
        key_valid[row, width - n:] = True
    dense_ms = workload.median_ms(lambda: [workload.dense_attention(*s) for s in seqs], device, long=True)
    solo_dense_ms = sum(workload.median_ms(lambda s=s: workload.dense_attention(*s), device) for s in seqs)
    for scoring, kernel in itertools.product(args.scorings, args.kernels):
        config = batch_config(args, scoring)
        run = lambda: sketchwalk_attention(q, k, v, config, 0, key_valid=key_valid, holes=False)  # noqa: E731
        row = dict(lengths=lens, width=width, total=sum(lens), block_size=block, density=0.2,
                   dense_below=args.dense_below, scoring=scoring, kernel=kernel, dense_ms=dense_ms,
                   solo_dense_ms=solo_dense_ms)
        with flexwalk.options(prefill_kernel=kernel):
            try:
                flexwalk.reset_counters()
                out, _ = run()
                counters = flexwalk.counters()
                err, budget = 0.0, 0.0
                for i, (s, n) in enumerate(zip(seqs, lens)):
                    solo, _ = sketchwalk_attention(*s, config, 0)
                    err = max(err, (out[i, :, width - n:].float() - solo[0].float()).abs().max().item())
                    budget = max(budget, 4 * torch.finfo(q.dtype).eps * solo.float().abs().max().item())
                sparse_ms = workload.median_ms(run, device, long=True)
                solo_sparse_ms = sum(workload.median_ms(lambda s=s: sketchwalk_attention(*s, config, 0), device)
                                     for s in seqs)
            except Exception as e:  # one failing kernel must not hide the others
                traceback.print_exc()
                record({**row, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
        ok = bool(torch.isfinite(out).all()) and err <= budget
        record({**row, "ran": workload.kernel_ran(counters), "sparse_ms": sparse_ms, "solo_sparse_ms": solo_sparse_ms,
                "speedup": dense_ms / sparse_ms, "solo_speedup": solo_dense_ms / solo_sparse_ms, "counters": counters,
                "check": dict(err=err, budget=budget, ok=ok)})
    del q, k, v, seqs
    _free(device)


def _forwards(model, ids, reps: int) -> dict:
    """A warm-up forward (compiles and captures what is new), then `reps` timed ones: the fastest,
    all times, peak memory, the counters of the last one and whether its logits are finite."""
    device = ids.device
    sync = workload.synchronized(lambda: None, device)
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(reps):
            flexwalk.reset_counters()
            sync()
            t0 = time.perf_counter()
            logits = model(ids, use_cache=False, logits_to_keep=1).logits
            sync()
            times.append(time.perf_counter() - t0)
    return dict(ttft_s=min(times), times_s=times, peak_gib=workload.peak_gib(device),
                counters=flexwalk.counters(), finite=bool(torch.isfinite(logits).all()))


def model_config(args, **fields) -> SketchWalkConfig:
    """sketchwalk_flex's configuration in the ttft and decode sections."""
    return SketchWalkConfig(block_size=args.model_block, density=0.2, dense_below=args.dense_below, **fields)


@torch.no_grad()
def ttft_section(args, model, record) -> None:
    """One row per (length, prefill scoring, kernel), each against sdpa's forward at that length."""
    for n in args.ttft_lengths:
        ids = workload.prompt(n, model.config.vocab_size, args.device)
        model.set_attn_implementation("sdpa")
        dense = _forwards(model, ids, args.ttft_reps)
        for scoring, kernel in itertools.product(args.scorings, args.ttft_kernels):
            config = model_config(args, prefill_scoring=scoring)
            flexwalk.configure(model, config, prefill_kernel=kernel)
            sparse = _forwards(model, ids, args.ttft_reps)
            c = sparse["counters"]
            sparse_layers = c.get("sparse_prefill", 0)
            ran = "fa4" if c.get("fa4_prefill") else "triton" if c.get("triton_prefill") else "flex"
            ok = dense["finite"] and sparse["finite"] and (n < config.dense_below or sparse_layers > 0)
            record(dict(n=n, scoring=scoring, kernel=kernel, ran=ran, layers=model.config.num_hidden_layers, sparse_layers=sparse_layers,
                        sdpa=dense, sketchwalk=sparse, speedup=dense["ttft_s"] / sparse["ttft_s"], ok=ok))
        model.set_attn_implementation("sdpa")
        _free(args.device)


def _decode_run(model, ids, steps: int) -> dict:
    """Prefill ids into a static cache, then `steps` greedy one-token steps, each timed: the
    median of the steps after the fourth, the counters, whether every logit was finite."""
    from transformers import StaticCache

    device = ids.device
    sync = workload.synchronized(lambda: None, device)
    n = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 8)
    flexwalk.reset_counters()
    finite, times = True, []
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits
        for i in range(steps):
            tok = logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            logits = model(tok, **cache_kwargs(cache), use_cache=True,
                           position_ids=torch.tensor([[n + i]], device=device)).logits
            sync()
            times.append(time.perf_counter() - t0)
            finite &= bool(torch.isfinite(logits).all())
    steady = sorted(times[4:] or times)
    ms = steady[len(steady) // 2] * 1e3
    del cache
    return dict(ms_per_token=ms, tokens_per_s=1e3 / ms, steps=steps, counters=flexwalk.counters(), finite=finite)


@torch.no_grad()
def decode_section(args, model, record) -> None:
    config = model_config(args, skip_decode=False)
    for n in args.decode_lengths:
        ids = workload.prompt(n, model.config.vocab_size, args.device)
        out = {}
        for impl in ("sdpa", "sketchwalk_flex"):
            if impl == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                flexwalk.configure(model, config)
                flexwalk.reset_decode_state(model)
            _decode_run(model, ids, 2)  # warm-up: this length's prefill and the first steps' captures
            _free(args.device)
            flexwalk.reset_decode_state(model)
            out[impl] = _decode_run(model, ids, args.decode_steps)
            _free(args.device)
        c = out["sketchwalk_flex"]["counters"]
        ok = (out["sdpa"]["finite"] and out["sketchwalk_flex"]["finite"] and c.get("sparse_decode", 0) > 0
              and not c.get("decode_stale_steps"))
        record(dict(n=n, cache="static", sdpa=out["sdpa"], sketchwalk=out["sketchwalk_flex"],
                    speedup=out["sdpa"]["ms_per_token"] / out["sketchwalk_flex"]["ms_per_token"], ok=ok))
        model.set_attn_implementation("sdpa")


# ----------------------------------------------------------------------------- outputs


def _block(row: dict) -> str:
    """A layer row's block size, with its prefill scoring."""
    return f"{row['block_size']}, {row.get('scoring', 'sketch')}"


def failed(report: dict) -> list[str]:
    """What went wrong: sections that raised, rows that raised or failed their check."""
    bad = [f"{name}: {err}" for name, err in report.get("errors", {}).items()]
    for row in report.get("layer", []):
        if "error" in row or not row["check"]["ok"]:
            bad.append(f"layer n={row['n']} batch {row['batch']} block {_block(row)} density {row['density']} "
                       f"{row['kernel']}: {row.get('error') or row['check']}")
    for name in ("varlen", "padded"):
        for row in report.get(name, []):
            if "error" in row or not row["check"]["ok"]:
                bad.append(f"{name} {row['kernel']}: {row.get('error') or row['check']}")
    for name in ("ttft", "decode"):
        bad += [f"{name} n={row['n']}: check failed ({_counts(row['sketchwalk']['counters'])}; logits finite: "
                f"{row['sdpa']['finite'] and row['sketchwalk']['finite']})" for row in report.get(name, []) if not row["ok"]]
    return bad


def _counts(counters: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counters.items())) or "no layer counted"


def _changed(config: dict) -> str:
    """The block size, the density and the SketchWalkConfig fields that differ from the defaults, as a call."""
    default = SketchWalkConfig().to_dict()
    return "SketchWalkConfig(" + ", ".join(f"{k}={v!r}" for k, v in config.items()
                                           if k in ("block_size", "density") or default.get(k) != v) + ")"


def _batch_kernel(row) -> str:
    """A varlen or padded row's kernel cell: the kernel asked for, the one that ran, the scoring."""
    return f"{row['kernel']} ({row['ran']}, {row.get('scoring', 'sketch')})"


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}"


def render_markdown(report: dict) -> str:
    """report.md: the conditions, one table per section, the figures written, what failed."""
    env, shape = report["env"], report["shape"]
    lines = ["# flexwalk benchmark report", "",
             f"{env['device']}; torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), triton {env['triton']}, "
             f"transformers {env['transformers']}, flash-attn-4 {env['flash_attn_4'] or 'not installed'}, "
             f"Python {env['python']}.  Attention shape: {shape['name']}, {shape['q_heads']} query / "
             f"{shape['kv_heads']} KV heads, head dim {shape['head_dim']}, {shape['dtype']}.", ""]
    if report.get("layer"):
        lines += ["## One attention layer (selection + attention)", "",
                  "Median ms; speedup = dense / sparse, both timed in this process; the check compares the output "
                  "with the eager oracle on its own selection and, at full budget, with dense attention.", "",
                  "| batch | prompt | block | density (achieved) | kernel (ran) | dense ms | selection ms | sparse ms "
                  "| **speedup** | check |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["layer"]:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['n']} | {_block(r)} | {r['density']} | {r['kernel']} | "
                             f"{_fmt(r['dense_ms'])} | | | | error: {r['error'][:80]} |")
                continue
            c = r["check"]
            verdict = "ok" if c["ok"] else f"FAILED (err {c['err']:.2e} / {c['budget']:.2e}, full {c['full_err']:.2e})"
            lines.append(f"| {r['batch']} | {r['n']} | {_block(r)} | {r['density']} ({r['achieved_density']:.3f}) "
                         f"| {r['kernel']} ({r['ran']}) | {_fmt(r['dense_ms'])} | {_fmt(r['selection_ms'])} | "
                         f"{_fmt(r['sparse_ms'])} | **{r['speedup']:.2f}x** | {verdict} |")
        lines.append("")
    if report.get("varlen"):
        r0 = report["varlen"][0]
        lines += ["## A packed batch (varlen)", "",
                  f"Sequences of {', '.join(map(str, r0['lengths']))} tokens ({r0['total']} in all) in one batch, "
                  f"block {r0['block_size']}, density {r0['density']}, dense_below {r0['dense_below']}.  Median ms; speedup = the "
                  "fastest dense varlen / sparse varlen; batch-1 = each sequence alone (sum of cuDNN / sum of "
                  "sparse); host cu = the sparse call with cu_seqlens on the host (no host sync).  Check: every "
                  "packed sequence equals its solo run.", "",
                  "| kernel (ran, scoring) | " + " | ".join(f"{k} ms" for k in r0["dense_ms"]) + " | sparse ms | **speedup** "
                  "| host cu ms | batch-1 speedup | check |", "|---|" + "---|" * len(r0["dense_ms"]) + "---|---|---|---|---|"]
        for r in report["varlen"]:
            dense = " | ".join(_fmt(x) for x in r["dense_ms"].values())
            if "error" in r:
                lines.append(f"| {r['kernel']} | {dense} | | | | | error: {r['error'][:80]} |")
                continue
            c = r["check"]
            verdict = "ok" if c["ok"] else f"FAILED (err {c['err']:.2e} / {c['budget']:.2e})"
            host_cu = _fmt(r["host_cu_sparse_ms"]) if "host_cu_sparse_ms" in r else ""
            lines.append(f"| {_batch_kernel(r)} | {dense} | {_fmt(r['sparse_ms'])} | **{r['speedup']:.2f}x** "
                         f"| {host_cu} | {r['solo_speedup']:.2f}x | {verdict} |")
        lines.append("")
    if report.get("padded"):
        r0 = report["padded"][0]
        lines += ["## A padded batch", "",
                  f"Sequences of {', '.join(map(str, r0['lengths']))} tokens left-padded to {r0['width']} in one batch "
                  f"(key_valid), block {r0['block_size']}, density {r0['density']}, dense_below {r0['dense_below']}.  "
                  "Median ms; speedup = cuDNN SDPA per sequence / the sparse padded batch; batch-1 = each sequence "
                  "alone.  Check: every row's real queries equal its solo run.", "",
                  "| kernel (ran, scoring) | cuDNN per sequence ms | sparse ms | **speedup** | batch-1 speedup | check |",
                  "|---|---|---|---|---|---|"]
        for r in report["padded"]:
            if "error" in r:
                lines.append(f"| {r['kernel']} | {_fmt(r['dense_ms'])} | | | | error: {r['error'][:80]} |")
                continue
            c = r["check"]
            verdict = "ok" if c["ok"] else f"FAILED (err {c['err']:.2e} / {c['budget']:.2e})"
            lines.append(f"| {_batch_kernel(r)} | {_fmt(r['dense_ms'])} | {_fmt(r['sparse_ms'])} | "
                         f"**{r['speedup']:.2f}x** | {r['solo_speedup']:.2f}x | {verdict} |")
        lines.append("")
    if report.get("ttft"):
        lines += ["## Time to first token", "", f"{report['model']}; sketchwalk_flex: `{_changed(report['model_config'])}`.", "",
                  "| prompt | kernel (ran) | sparse layers | sdpa s | sketchwalk_flex s | **speedup** | peak GiB, sdpa / "
                  "sketchwalk | check |", "|---|---|---|---|---|---|---|---|"]
        for r in report["ttft"]:
            scoring = r.get("scoring", "sketch")
            kernel = f"{r['kernel']} ({r['ran']}, {scoring})"
            lines.append(f"| {r['n']} | {kernel} | {r['sparse_layers']} of {r['layers']} | "
                         f"{r['sdpa']['ttft_s']:.3f} | {r['sketchwalk']['ttft_s']:.3f} | **{r['speedup']:.2f}x** | "
                         f"{_fmt(r['sdpa']['peak_gib'])} / {_fmt(r['sketchwalk']['peak_gib'])} | "
                         f"{'ok' if r['ok'] else 'FAILED'} |")
        lines.append("")
    if report.get("decode"):
        lines += ["## Decode", "", "The same model, a static cache, sparse decode (skip_decode=False); median of the "
                  "steps after the fourth.", "",
                  "| context | sdpa ms/token | sketchwalk_flex ms/token | tokens/s, sdpa / sketchwalk | **speedup** | "
                  "sparse decode steps (graphed) | check |", "|---|---|---|---|---|---|---|"]
        for r in report["decode"]:
            a, b = r["sdpa"], r["sketchwalk"]
            c = b["counters"]
            lines.append(f"| {r['n']} | {a['ms_per_token']:.2f} | {b['ms_per_token']:.2f} | {a['tokens_per_s']:.1f} / "
                         f"{b['tokens_per_s']:.1f} | **{r['speedup']:.2f}x** | {c.get('sparse_decode', 0)} "
                         f"({c.get('decode_graph_steps', 0)}) | {'ok' if r['ok'] else 'FAILED'} |")
        lines.append("")
    lines += [f"![{name}]({file})" for name, file in report.get("figures", {}).items()]
    if report.get("figures_skipped"):
        lines.append(f"Figures not drawn: {report['figures_skipped']}.")
    bad = failed(report)
    lines += ["", "## Failed", ""] + [f"- {b}" for b in bad] if bad else ["", "Every check passed."]
    return "\n".join(lines) + "\n"


def write_figures(report: dict, out: Path) -> dict[str, str]:
    """The figures of the sections measured so far: {section: file name}.  Raises ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    if any("speedup" in r for r in report.get("layer", [])):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines: dict[tuple, list] = {}
        for r in report["layer"]:
            if "speedup" in r:
                key = (r["kernel"], r["ran"], _block(r), r["density"], r["batch"])
                lines.setdefault(key, []).append((r["n"], r["speedup"]))
        for (kernel, ran, block, density, batch), pts in sorted(lines.items()):
            pts.sort()
            label = f"{kernel}{'' if kernel == ran else f' ({ran})'}, block {block}, density {density}, batch {batch}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(f"speedup over {report['layer'][0]['dense']}")
        ax.set_title(f"One attention layer, {report['shape']['name']} ({report['env']['device']})")
        ax.legend(fontsize=7)
        written["layer"] = _save(fig, out, FIGURES["layer"], plt)
    if report.get("ttft"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ns = sorted({r["n"] for r in report["ttft"]})
        sdpa = {r["n"]: r["sdpa"]["ttft_s"] for r in report["ttft"]}
        ax.plot(ns, [sdpa[n] for n in ns], marker="o", label="sdpa")
        for kernel, scoring in dict.fromkeys((r["kernel"], r.get("scoring", "sketch")) for r in report["ttft"]):
            rows = sorted((r["n"], r["sketchwalk"]["ttft_s"], r["speedup"]) for r in report["ttft"]
                          if r["kernel"] == kernel and r.get("scoring", "sketch") == scoring)
            label = f"sketchwalk_flex ({kernel}, {scoring})"
            ax.plot([x[0] for x in rows], [x[1] for x in rows], marker="o", label=label)
            for n, t, s in rows:
                ax.annotate(f"{s:.2f}x", (n, t), textcoords="offset points", xytext=(4, -12), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first token, s")
        ax.set_title(f"{report['ttft'][0]['layers']}-layer model ({report['env']['device']})")
        ax.legend(fontsize=8)
        written["ttft"] = _save(fig, out, FIGURES["ttft"], plt)
    if report.get("decode"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        rows = sorted(report["decode"], key=lambda r: r["n"])
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["sdpa"]["tokens_per_s"] for r in rows], 0.4, label="sdpa")
        ax.bar([i + 0.2 for i in x], [r["sketchwalk"]["tokens_per_s"] for r in rows], 0.4,
               label="sketchwalk_flex, sparse decode")
        ax.set_xticks(list(x), [f"{r['n']} ({r['speedup']:.2f}x)" for r in rows])
        ax.set_xlabel("context tokens (speedup)")
        ax.set_ylabel("decode tokens / s, batch 1")
        ax.set_title(f"Decode with a static cache ({report['env']['device']})")
        ax.legend(fontsize=8)
        written["decode"] = _save(fig, out, FIGURES["decode"], plt)
    return written


def _save(fig, out: Path, name: str, plt) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def write_outputs(report: dict, out: Path) -> None:
    """report.json, the figures (where matplotlib is installed) and report.md."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        report["figures"] = write_figures(report, out)
        report.pop("figures_skipped", None)
    except ImportError as e:
        report["figures_skipped"] = f"matplotlib is not installed ({e})"
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(render_markdown(report))


def _model(args):
    """The ttft and decode sections' model (sdpa, eval, on the device) and its description."""
    if args.model is None:
        model = workload.build_model(args.device, args.ttft_layers)
        kind = "random-weight LlamaConfig model"
    else:
        from transformers import AutoModelForCausalLM

        from flexwalk.models import resolve_model

        model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=workload.shape_for(args.device).dtype,
                                                     attn_implementation="sdpa").to(args.device).eval()
        kind = f"{args.model} ({model.config.model_type})"
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return model, (f"{kind}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} / "
                   f"{c.num_key_value_heads} heads of {head_dim}, {model.dtype}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = dict(env=environment(args.device), shape=workload.shape_for(args.device).to_dict(),
                  args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, errors={})
    print(json.dumps(report["env"]), flush=True)
    model = None
    for name in args.sections:
        t0 = time.time()
        rows = report.setdefault(name, [])

        def record(row, rows=rows):
            rows.append(row)
            print(name, json.dumps(row, default=str)[:400], flush=True)
            write_outputs(report, args.out)

        try:
            if name == "layer":
                layer_section(args, record)
            elif name == "varlen":
                varlen_section(args, record)
            elif name == "padded":
                padded_section(args, record)
            else:
                if model is None:
                    model, report["model"] = _model(args)
                    report["model_config"] = model_config(args).to_dict()
                (ttft_section if name == "ttft" else decode_section)(args, model, record)
        except Exception as e:  # one broken section must not hide the others
            traceback.print_exc()
            report["errors"][name] = f"{type(e).__name__}: {e}"[:1000]
        print(f"({name}: {time.time() - t0:.0f} s)", flush=True)
        write_outputs(report, args.out)
    bad = failed(report)
    for b in bad:
        print("FAILED", b, file=sys.stderr)
    print(f"wrote {args.out / 'report.json'}, {args.out / 'report.md'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
