"""Regenerate the figures under docs/img/ (one command, CPU is enough):

    .venv/bin/python docs/make_figures.py

(TORCHINDUCTOR_CACHE_DIR and FLEXWALK_CACHE default to the repository's .cache/, as in the Makefile.)

1. docs/img/density_vs_length.png: expected_density() of every preset over sequence length.
2. docs/img/block_mask_smollm2.png: the block selection SketchWalk really makes in a few
   layers of SmolLM2-135M-Instruct on a ~2K-token needle-in-a-haystack prompt.  The selection
   is recorded by wrapping flexwalk.attention.sketchwalk_selection for the duration of one
   forward pass (the library itself is not changed).

3. docs/img/ttft_tp_h200.png: time to first token of the 8B-shaped model on one H200 and
   under tensor parallelism on two, sdpa vs sketchwalk_flex (from docs/data/tp_h200x2/).

4. docs/img/prefill_speedup_h100.png: one attention layer of the 8B shape, sketchwalk's total
   (selection + mask + attention) against cuDNN SDPA over prompt length, batch 1 and 4, at
   10/20/30% density with FlashAttention 4's kernel (from docs/data/session22/gpu_prefill_fa4.json;
   dashed: 20% with flexwalk's Triton kernel, docs/data/h100_session16/grid_b1_b4.json).

5. docs/img/niah_gemma3_by_length.png: Gemma 3 270M NIAH accuracy (mean of 8 RULER tasks, 400
   samples per point, H100) against prompt length: sdpa, SketchWalk with the paper's 64-wide
   sketch, with the exact sketch, with the residual, with both (the default on this model since
   session 19), and the oracle at 32K (from docs/data/niah/gemma3_*).

6. docs/img/selection_share_h100.png: the selection's share (selection + tables over the whole
   layer, FlashAttention 4 running) at 20% density over prompt length, batch 1 and 4, in the grids
   of sessions 22, 23 and 24 (docs/benchmarks.md 4l, 4m, 4n), against issue 5's 5% line.

7. docs/img/decode_scoring_smollm2.png: sparse decode accuracy on SmolLM2 at 8K (niah_single_1
   and _2, 50 samples each, H100), the five runs of one session: sdpa, dense decode after a
   sparse prefill, and sparse decode with block means ("sketch") or key bounds ("bound"), with
   and without pins (from docs/data/niah/smollm2_8k_decode_scoring_h100/).

Options: --only density|mask|ttft|speed|gemma|share|decode, --length N (prompt tokens, default 2048), --depth D (needle).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# Same caches as the Makefile (compiled kernels, converted model), unless already set.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_ROOT / ".cache" / "inductor"))
os.environ.setdefault("FLEXWALK_CACHE", str(_ROOT / ".cache" / "models"))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

IMG = Path(__file__).resolve().parent / "img"
LAYERS = (2, 10, 17, 29)


# ----------------------------------------------------------------------------- density


def density_figure(path: Path) -> None:
    from flexwalk import PRESETS, expected_density

    lengths = np.unique(np.geomspace(256, 131072, 200).astype(int))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, cfg in PRESETS.items():
        per_layer = [expected_density(cfg, int(n)) for n in lengths]
        model = [expected_density(cfg, int(n), num_layers=30) for n in lengths]
        label = f"{name} (density={cfg.density}, block={cfg.block_size})"
        (line,) = axes[0].plot(lengths, per_layer, label=label)
        axes[1].plot(lengths, model, color=line.get_color(), label=label)
    axes[0].set_title("one sparse layer\nexpected_density(cfg, n)", fontsize=11)
    axes[1].set_title("30-layer model (dense layers, dense_below included)\nexpected_density(cfg, n, num_layers=30)", fontsize=11)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_xticks([2**k for k in range(8, 18)])
        ax.set_xticklabels(["256", "512", "1K", "2K", "4K", "8K", "16K", "32K", "64K", "128K"])
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("fraction of causal blocks computed")
    axes[0].legend(fontsize=8, loc="upper right")
    _save(fig, path)


# ----------------------------------------------------------------------------- block mask


@contextlib.contextmanager
def record_selections(store: dict):
    """Wrap the selection the compiled sparse path calls; record each layer's block table."""
    import flexwalk.prefill as attention

    original = attention.sketchwalk_selection

    def recording(q, k, config, layer_idx, state=None, **kwargs):
        selection, new_state = original(q, k, config, layer_idx, state, **kwargs)
        store[layer_idx] = selection
        return selection, new_state

    attention.sketchwalk_selection = recording
    try:
        yield store
    finally:
        attention.sketchwalk_selection = original


def needle_token_span(tokenizer, input_ids: list[int], answer: str) -> tuple[int, int]:
    """[first, last] token index of the needle's number (the only digits in the prompt)."""
    digits = [i for i, t in enumerate(input_ids) if any(c.isdigit() for c in tokenizer.decode([t]))]
    if not digits:
        raise RuntimeError(f"needle {answer} not found in the prompt")
    return digits[0], digits[-1]


def mask_figure(path: Path, length: int, depth: float) -> None:
    import torch

    import flexwalk
    from flexwalk.demo import needle_prompt
    from flexwalk.generation import eos_ids as _eos_ids, greedy
    from flexwalk.config import SketchWalkConfig
    from flexwalk.models import load_model

    cfg = SketchWalkConfig(density=0.2, dense_below=256, block_size=64)
    model, tok = load_model("smollm2-135m", attn_implementation="sketchwalk_flex", sketchwalk=cfg, device="cpu")
    sample = needle_prompt(tok, length, depth, seed=0)
    ids = sample.input_ids
    first, last = needle_token_span(tok, ids, sample.answer)
    bs = cfg.block_size
    needle_blocks = sorted({first // bs, last // bs})

    store: dict = {}
    flexwalk.reset_counters()
    with record_selections(store), torch.no_grad():
        new, prefill_s, _, _ = greedy(model, ids, max_new_tokens=8, eos_ids=_eos_ids(model, tok))
    answer_text = tok.decode(new, skip_special_tokens=True)
    print(f"prompt {len(ids)} tokens, needle {sample.answer} at tokens {first}-{last} (block {needle_blocks}); "
          f"prefill {prefill_s:.1f} s; answer {answer_text!r}; counters {flexwalk.counters()}")

    for layer, sel in sorted(store.items()):
        t = sel.mask[0].cpu().numpy().copy()
        nb = t.shape[-1]
        t[:, 0] = False  # sink
        t[np.arange(nb), np.arange(nb)] = False  # diagonal
        t[nb - cfg.dense_tail_blocks:] = False  # dense tail
        picks = t.sum(0)
        top = np.argsort(-picks, kind="stable")[:4]
        print(f"layer {layer:2d}: density {sel.density():.3f}; rows picking needle block {needle_blocks}: "
              f"{int(t[:, needle_blocks].any(1).sum())}; most-picked key blocks {[(int(j), int(picks[j])) for j in top]}")
    layers = [layer for layer in LAYERS if layer in store]
    if not layers:
        raise RuntimeError(f"no sparse layer ran (counters: {flexwalk.counters()})")
    cmap = ListedColormap(["#ffffff", "#dfe6ee", "#1f4e9a"])  # non-causal, causal not kept, kept
    ncols = 2 if len(layers) > 1 else 1
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 5.0 * nrows + 0.9), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers):
        sel = store[layer]
        table = sel.mask[0].cpu().numpy()
        nb = table.shape[-1]
        causal = np.tril(np.ones((nb, nb), dtype=bool))
        img = np.where(table, 2, np.where(causal, 1, 0))
        ax.imshow(img, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        for b in needle_blocks:
            ax.axvline(b, color="#d62728", lw=1.0, ls=":", alpha=0.9)
        ax.set_title(f"layer {layer}: density {sel.density():.3f}", fontsize=11)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        ax.set_xticks(range(0, nb, 4))
        ax.set_yticks(range(0, nb, 4))
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="#1f4e9a", label="selected"),
        plt.Rectangle((0, 0), 1, 1, color="#dfe6ee", label="causal, not selected"),
        plt.Rectangle((0, 0), 1, 1, facecolor="#ffffff", edgecolor="#999999", label="non-causal"),
        plt.Line2D([0], [0], color="#d62728", ls=":", label=f"needle block ({', '.join(map(str, needle_blocks))})"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=10)
    fig.suptitle(
        f"SketchWalk selection, SmolLM2-135M-Instruct, {len(ids)}-token needle prompt\n"
        f"block_size={bs}, density=0.2, walk={cfg.walk}; answer {answer_text.strip()!r} "
        f"(needle {sample.answer})", fontsize=12,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.99))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- TTFT, one vs two GPUs


def ttft_figure(path: Path) -> None:
    import json

    data = Path(__file__).resolve().parent / "data" / "tp_h200x2"
    runs = {"1 GPU": json.loads((data / "gpu_tp_single.json").read_text()),
            "2 GPUs (tp_plan)": json.loads((data / "gpu_tp_tp.json").read_text())}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, run), style in zip(runs.items(), ("-", "--")):
        n = run["lengths"]
        for impl, color in (("sdpa", "tab:gray"), ("sketchwalk_flex", "tab:blue")):
            axes[0].plot(n, [run["ttft"][f"{x}/{impl}"]["ttft_s"] for x in n], style, color=color, marker="o",
                         label=f"{impl}, {name}")
        axes[1].plot(n, [run["ttft"][f"{x}/speedup"] for x in n], style, color="tab:blue", marker="o", label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("time to first token (s)")
    axes[0].set_title("Llama-3.1-8B-shaped model, bf16, batch 1", fontsize=11)
    axes[1].set_ylabel("sdpa TTFT / sketchwalk_flex TTFT")
    axes[1].set_title("speedup at density 0.2 (block 128)", fontsize=11)
    axes[1].axhline(1.0, color="k", lw=0.5)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([32768, 65536, 131072])
        ax.set_xticklabels(["32K", "64K", "128K"])
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{runs['1 GPU']['env']['device']}, torch {runs['1 GPU']['env']['torch']}", fontsize=9)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _length_axis(ax, batch: int) -> None:
    """A prompt-length x axis (log 2, 4K-128K) for one batch size's panel."""
    ax.set_xscale("log", base=2)
    ax.set_xticks([4096, 8192, 16384, 32768, 65536, 131072])
    ax.set_xticklabels(["4K", "8K", "16K", "32K", "64K", "128K"])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_title(f"batch {batch}", fontsize=11)
    ax.grid(True, alpha=0.3)


def speed_figure(path: Path) -> None:
    import json

    data = Path(__file__).resolve().parent / "data"
    run = json.loads((data / "session22" / "gpu_prefill_fa4.json").read_text())  # FlashAttention 4 (4l)
    env = run["env"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, batch in zip(axes, (1, 4)):
        for density, color in ((0.1, "tab:green"), (0.2, "tab:blue"), (0.3, "tab:orange")):
            rows = [r for r in run["grid"] if r["density"] == density and r["batch"] == batch]
            n = [r["n"] for r in rows]
            ax.plot(n, [r["speedup_vs_cudnn"] for r in rows], "-o", color=color, label=f"density {density:.0%}")
        # the same layer with flexwalk's Triton kernel instead of FlashAttention 4 (session 16's grid)
        old = json.loads((data / "h100_session16" / "grid_b1_b4.json").read_text())
        rows = [r for r in old["grid"] if r["density"] == 0.2 and r["batch"] == batch]
        ax.plot([r["n"] for r in rows], [r["speedup_vs_cudnn"] for r in rows], "--", color="tab:blue", alpha=0.45,
                label="20%, Triton kernel (without FA4)")
        ax.plot([8192, 32768, 131072], [1.5, 3.0, 3.8], "k_", ms=14, mew=2, label="issue 5's targets at 20%")
        ax.axhline(1.0, color="k", lw=0.5)
        _length_axis(ax, batch)
        ax.legend(fontsize=8, title="selection + tables + attention, one layer", title_fontsize=7)
    axes[0].set_ylabel("cuDNN SDPA time / sketchwalk time")
    fig.suptitle(f"one Llama-3.1-8B attention layer, bf16, block 128, FlashAttention 4 block-sparse kernel; "
                 f"{env['device']}, torch {env['torch']}, triton {env['triton']}", fontsize=9)
    _save(fig, path)


def share_figure(path: Path) -> None:
    import json

    data = Path(__file__).resolve().parent / "data"
    runs = [("session 22 (4l): torch.mean head means, then 8 launches", "session22/gpu_prefill_fa4.json", "tab:gray"),
            ("session 23 (4m): one pass over q and k", "session23/grid.json", "tab:orange"),
            ("session 24 (4n): one pass, 5-6 launches", "session24/grid.json", "tab:blue")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    env = None
    for ax, batch in zip(axes, (1, 4)):
        for label, name, color in runs:
            run = json.loads((data / name).read_text())
            env = run["env"]
            rows = sorted((r for r in run["grid"] if r["density"] == 0.2 and r["batch"] == batch), key=lambda r: r["n"])
            ax.plot([r["n"] for r in rows], [100 * r["select_share"] for r in rows], "-o", color=color, label=label)
        ax.axhline(5.0, color="k", lw=1, ls="--", label="issue 5's target from 32K: at most 5%")
        ax.axvspan(32768 / 1.2, 131072 * 1.2, color="k", alpha=0.04)
        ax.set_yscale("log")
        ax.set_yticks([1, 2, 5, 10, 20, 30])
        ax.set_yticklabels(["1%", "2%", "5%", "10%", "20%", "30%"])
        _length_axis(ax, batch)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("selection + tables / whole layer")
    fig.suptitle(f"the selection's share of one Llama-3.1-8B attention layer at 20% density (FlashAttention 4 "
                 f"attends); {env['device']}, torch {env['torch']}, triton {env['triton']}", fontsize=9)
    _save(fig, path)


def gemma_figure(path: Path) -> None:
    """Mean NIAH accuracy of Gemma 3 270M over prompt length per method, with the dense - 2 line."""
    import json

    niah = Path(__file__).resolve().parent / "data" / "niah"

    def mean(run: str, method: str) -> float | None:
        f = niah / run / method / "samples.jsonl"
        if not f.exists():
            return None
        scores = [json.loads(line)["score_all"] for line in f.read_text().splitlines() if line]
        return sum(scores) / len(scores)

    lengths = ["2k", "4k", "8k", "16k", "32k"]
    series = [("sdpa (dense)", "gemma3_{}_h100", "sdpa", "k", "-o"),
              ("SketchWalk, sketch_dim 64 (the paper's)", "gemma3_{}_h100", "sketchwalk", "tab:gray", "--o"),
              ("SketchWalk, exact sketch", "gemma3_{}_h100_sketch256", "sketchwalk", "tab:blue", "--o"),
              ("SketchWalk, sketch_dim 64 + residual", "gemma3_{}_h100_residual", "sketchwalk", "tab:orange", "--s"),
              ("SketchWalk, exact sketch + residual (default)", "gemma3_{}_h100_exact_residual", "sketchwalk",
               "tab:red", "-s"),
              ("oracle top-k (exact block mass)", "gemma3_{}_h100_oracle", "oracle", "tab:green", "D")]
    x = np.arange(len(lengths))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    dense = [mean(f"gemma3_{n}_h100", "sdpa") for n in lengths]
    ax.fill_between(x, [d - 2 for d in dense], dense, color="k", alpha=0.08, label="within 2 points of dense")
    for label, run, method, color, style in series:
        ys = [mean(run.format(n), method) for n in lengths]
        pts = [(i, y) for i, y in enumerate(ys) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label, ms=5)
    ax.set_xticks(x)
    ax.set_xticklabels([n.upper() for n in lengths])
    ax.set_xlabel("prompt length (Gemma 3 tokens)")
    ax.set_ylabel("RULER NIAH string_match_all, % (8 tasks x 50)")
    ax.set_title("Gemma 3 270M, 20% density, H100 bf16: 400 samples per point (SE about 1.2 against dense)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def decode_figure(path: Path) -> None:
    """Grouped bars: niah_single_1 / _2 accuracy per decode run, with a standard error bar."""
    import json

    root = Path(__file__).resolve().parent / "data" / "niah" / "smollm2_8k_decode_scoring_h100"
    runs = [("sdpa", "sm8k_dense_decode", "sdpa", "k"),
            ("sparse prefill,\ndense decode", "sm8k_dense_decode", "sketchwalk", "tab:gray"),
            ("sparse decode,\nblock means + pins", "sm8k_sketch_pins", "sketchwalk", "tab:blue"),
            ("sparse decode,\nkey bounds, no pins", "sm8k_bound_nopins", "sketchwalk", "tab:orange"),
            ("sparse decode,\nkey bounds + pins\n(its default)", "sm8k_bound_pins", "sketchwalk", "tab:red")]
    tasks = ("niah_single_1", "niah_single_2")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(runs)
    for r, (label, run, method, color) in enumerate(runs):
        cells = {c["task"]: c for c in json.loads((root / run / method / "summary.json").read_text())["cells"]}
        ys = [cells[t]["string_match_all"] for t in tasks]
        ses = [100 * np.sqrt(y / 100 * (1 - y / 100) / cells[t]["n"]) for y, t in zip(ys, tasks)]
        xs = np.arange(len(tasks)) + (r - (len(runs) - 1) / 2) * width
        ax.bar(xs, ys, width, yerr=ses, color=color, label=label.replace("\n", " "), capsize=2)
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("string_match_all, % (50 samples)")
    ax.set_title("SmolLM2-135M, 8K prompts, H100 bf16, decode density 0.22: one session", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("density", "mask", "ttft", "speed", "gemma", "share", "decode"))
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=0.4)
    args = parser.parse_args(argv)
    IMG.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "density"):
        density_figure(IMG / "density_vs_length.png")
    if args.only in (None, "mask"):
        mask_figure(IMG / "block_mask_smollm2.png", args.length, args.depth)
    if args.only in (None, "ttft"):
        ttft_figure(IMG / "ttft_tp_h200.png")
    if args.only in (None, "speed"):
        speed_figure(IMG / "prefill_speedup_h100.png")
    if args.only in (None, "gemma"):
        gemma_figure(IMG / "niah_gemma3_by_length.png")
    if args.only in (None, "share"):
        share_figure(IMG / "selection_share_h100.png")
    if args.only in (None, "decode"):
        decode_figure(IMG / "decode_scoring_smollm2.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
