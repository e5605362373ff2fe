"""Regenerate every figure under docs/img/ from docs/data/ (one command, CPU is enough):

    .venv/bin/python docs/make_figures.py            # or --only NAME for one figure

(TORCHINDUCTOR_CACHE_DIR and FLEXWALK_CACHE default to the repository's .cache/, as in the Makefile.)

| --only | figure | reads |
|---|---|---|
| density | img/density_vs_length.png: expected_density() of every preset by length | flexwalk itself |
| mask | img/block_mask_smollm2.png: the block selection SketchWalk makes in four layers of SmolLM2-135M-Instruct on a ~2K-token needle prompt (runs the model on the CPU, about a minute) | the packaged model |
| speed | img/prefill_speedup_h100.png: one Llama-3.1-8B attention layer against cuDNN SDPA by prompt length and density | data/prefill/grid_*.json |
| share | img/selection_share_h100.png: the selection's share of that layer by prompt length | data/prefill/grid_fa4_h100.json, grid_triton_h100.json |
| ttft | img/ttft_tp_h200.png: time to first token on one H200 and under tensor parallelism on two | data/tp/ttft_*.json |
| gemma | img/niah_gemma3_by_length.png: Gemma 3 270M NIAH accuracy by length, the defaults against the paper's settings | data/niah/gemma3/ |
| qwen | img/niah_qwen15b.png: Qwen2.5-Coder-1.5B NIAH, each rule's paired difference to dense by length, and the defaults against achieved density | data/niah/qwen15b/ |
| density_accuracy | img/accuracy_vs_density.png: SmolLM2 NIAH accuracy and dense-mass recall against achieved density | data/niah/smollm2/, data/niah/fidelity/ |
| decode | img/decode_scoring_smollm2.png: sparse decode accuracy by decode rule, SmolLM2 at 8K | data/niah/smollm2/8k-decode_scoring/ |

Options: --only NAME, --length N (prompt tokens of the mask figure, default 2048), --depth D (its needle).
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
DATA = Path(__file__).resolve().parent / "data"
LAYERS = (2, 10, 17, 29)
NIAH_LENGTHS = ("2k", "4k", "8k", "16k", "32k")


def _json(path: Path):
    import json

    return json.loads(path.read_text())


def _samples(run: Path) -> list[dict]:
    """The per-sample records of a `flexwalk niah run` result directory (plain or gzip-compressed)."""
    from flexwalk.niah.report.load import read_samples

    return read_samples(run)


def _niah_mean(run: Path) -> float | None:
    """Mean string_match_all over a run's samples, or None where the run is absent."""
    from flexwalk.niah.report.load import samples_path

    if samples_path(run) is None:
        return None
    scores = [r["score_all"] for r in _samples(run)]
    return sum(scores) / len(scores)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _length_axis(ax, batch: int, lengths=(4096, 8192, 16384, 32768, 65536, 131072)) -> None:
    """A prompt-length x axis (log 2) for one batch size's panel."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths))
    ax.set_xticklabels([f"{n // 1024}K" for n in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_title(f"batch {batch}", fontsize=11)
    ax.grid(True, alpha=0.3)


def _env_line(env: dict) -> str:
    return f"{env['device']}, torch {env['torch']}, triton {env['triton']}"


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
    """Record the BlockSelection of each sparse prefill layer during a forward pass.

    flexwalk.sketchwalk_attention is wrapped wherever a loaded flexwalk module refers to it; for
    each layer that went sparse (it returned a new walk state) the wrapper recomputes the layer's
    selection with the public flexwalk.sketchwalk_selection on the same q, k and incoming state,
    which the tests hold equal to what the fused prefill path attends. The library is unchanged.
    """
    import flexwalk

    original = flexwalk.sketchwalk_attention

    def recording(q, k, v, config, layer_idx, state=None, **kwargs):
        out, new_state = original(q, k, v, config, layer_idx, state, **kwargs)
        if new_state is not state and kwargs.get("window") is None:
            store[layer_idx], _ = flexwalk.sketchwalk_selection(
                q, k, config, layer_idx, state, key_valid=kwargs.get("key_valid"), scale=kwargs.get("scale"))
        return out, new_state

    patched = [m for name, m in list(sys.modules.items())
               if (name == "flexwalk" or name.startswith("flexwalk."))
               and getattr(m, "sketchwalk_attention", None) is original]
    for m in patched:
        m.sketchwalk_attention = recording
    try:
        yield store
    finally:
        for m in patched:
            m.sketchwalk_attention = original


def _needle_prompt():
    """The demo's needle prompt builder, wherever this version of flexwalk keeps it."""
    import importlib

    for name in ("flexwalk.demo", "flexwalk.generation", "flexwalk.cli"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "needle_prompt"):
            return module.needle_prompt
    raise ImportError("flexwalk has no needle_prompt (looked in flexwalk.demo, flexwalk.generation and flexwalk.cli)")


def needle_token_span(tokenizer, input_ids: list[int], answer: str) -> tuple[int, int]:
    """[first, last] token index of the needle's number (the only digits in the prompt)."""
    digits = [i for i, t in enumerate(input_ids) if any(c.isdigit() for c in tokenizer.decode([t]))]
    if not digits:
        raise RuntimeError(f"needle {answer} not found in the prompt")
    return digits[0], digits[-1]


def mask_figure(path: Path, length: int, depth: float) -> None:
    import torch

    import flexwalk
    from flexwalk import SketchWalkConfig
    from flexwalk.models import load_model

    cfg = SketchWalkConfig(density=0.2, dense_below=256, block_size=64)
    model, tok = load_model("smollm2-135m", attn_implementation="sketchwalk_flex", sketchwalk=cfg, device="cpu")
    sample = _needle_prompt()(tok, length, depth, seed=0)
    ids = sample.input_ids
    first, last = needle_token_span(tok, ids, sample.answer)
    bs = cfg.block_size
    needle_blocks = sorted({first // bs, last // bs})

    store: dict = {}
    flexwalk.reset_counters()
    with record_selections(store), torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False)
    answer_text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    print(f"prompt {len(ids)} tokens, needle {sample.answer} at tokens {first}-{last} (block {needle_blocks}); "
          f"answer {answer_text!r}; counters {flexwalk.counters()}")

    for layer, sel in sorted(store.items()):
        t = sel.mask[0].cpu().numpy().copy()
        nb = t.shape[-1]
        t[:, 0] = False  # sink
        for lag in range(cfg.local_blocks):  # the diagonal and the local blocks before it
            t[np.arange(lag, nb), np.arange(nb - lag)] = False
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


# ----------------------------------------------------------------------------- GPU speed


def speed_figure(path: Path) -> None:
    """One 8B-shaped attention layer (selection + tables + attention) against cuDNN SDPA."""
    densities = _json(DATA / "prefill" / "grid_densities_h100.json")  # FA4, 10/20/30%, 4K-128K
    fa4 = _json(DATA / "prefill" / "grid_fa4_h100.json")  # FA4, 20%, the shipped selection
    triton = _json(DATA / "prefill" / "grid_triton_h100.json")  # flexwalk's Triton kernel, 20%
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, batch in zip(axes, (1, 4)):
        for density, color in ((0.1, "tab:green"), (0.2, "tab:blue"), (0.3, "tab:orange")):
            rows = sorted((r for r in densities["grid"] if r["density"] == density and r["batch"] == batch),
                          key=lambda r: r["n"])
            ax.plot([r["n"] for r in rows], [r["speedup_vs_cudnn"] for r in rows], ":o", color=color, ms=4,
                    alpha=0.7, label=f"{density:.0%}, FlashAttention 4 (density grid)")
        for run, style, label in ((fa4, "-s", "20%, FlashAttention 4"), (triton, "--s", "20%, flexwalk's Triton kernel")):
            rows = sorted((r for r in run["grid"] if r["batch"] == batch), key=lambda r: r["n"])
            ax.plot([r["n"] for r in rows], [r["speedup_vs_cudnn"] for r in rows], style, color="tab:blue", label=label)
        ax.axhline(1.0, color="k", lw=0.5)
        _length_axis(ax, batch)
        ax.legend(fontsize=7, title="cuDNN time / sketchwalk time, same process", title_fontsize=7)
    axes[0].set_ylabel("speedup over cuDNN SDPA")
    fig.suptitle("one Llama-3.1-8B attention layer (32/8 heads, head dim 128), bf16, block 128; "
                 + _env_line(fa4["env"]), fontsize=9)
    _save(fig, path)


def share_figure(path: Path) -> None:
    """The selection's share of the layer (selection + tables over the whole layer) at 20%."""
    runs = [("attention by FlashAttention 4", DATA / "prefill" / "grid_fa4_h100.json", "tab:blue"),
            ("attention by flexwalk's Triton kernel", DATA / "prefill" / "grid_triton_h100.json", "tab:orange")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    env = None
    for ax, batch in zip(axes, (1, 4)):
        for label, name, color in runs:
            run = _json(name)
            env = run["env"]
            rows = sorted((r for r in run["grid"] if r["batch"] == batch), key=lambda r: r["n"])
            share = [100 * r["select_mask_ms"] / r["total_ms"] for r in rows]
            ax.plot([r["n"] for r in rows], share, "-o", color=color, label=label)
        ax.set_yscale("log")
        ax.set_yticks([0.5, 1, 2, 5, 10, 20])
        ax.set_yticklabels(["0.5%", "1%", "2%", "5%", "10%", "20%"])
        _length_axis(ax, batch, (8192, 16384, 32768, 65536, 131072))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("selection + tables / whole layer")
    fig.suptitle("the selection's share of one Llama-3.1-8B attention layer at 20% density; " + _env_line(env),
                 fontsize=9)
    _save(fig, path)


# ----------------------------------------------------------------------------- TTFT, one vs two GPUs


def ttft_figure(path: Path) -> None:
    runs = {"1 GPU": _json(DATA / "tp" / "ttft_one_gpu_h200.json"),
            "2 GPUs (tp_plan)": _json(DATA / "tp" / "ttft_two_gpus_h200.json")}
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


# ----------------------------------------------------------------------------- accuracy


def gemma_figure(path: Path) -> None:
    """Mean NIAH accuracy of Gemma 3 270M by prompt length: the defaults against the paper's settings."""
    root = DATA / "niah" / "gemma3"
    series = [("sdpa (dense)", "{}", "sdpa", "k", "-o"),
              ("defaults (walk; one-hop scores the same)", "{}", "sketchwalk", "tab:red", "-s"),
              ("dense_layers=2 (first full layer sparse too)", "{}-dense_layers2", "sketchwalk", "tab:orange", "--s"),
              ("dense_layers=2, residual=False", "{}-dense_layers2-no_residual", "sketchwalk", "tab:blue", "--o"),
              ("the paper's: dense_layers=2, residual=False, sketch_dim=64", "{}-paper", "sketchwalk", "tab:gray", ":o")]
    x = np.arange(len(NIAH_LENGTHS))
    fig, ax = plt.subplots(figsize=(7.8, 4.4))
    dense = [_niah_mean(root / n / "sdpa") for n in NIAH_LENGTHS]
    ax.fill_between(x, [d - 2 for d in dense], dense, color="k", alpha=0.08, label="within 2 points of dense")
    for label, run, method, color, style in series:
        ys = [_niah_mean(root / run.format(n) / method) for n in NIAH_LENGTHS]
        pts = [(i, y) for i, y in enumerate(ys) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label, ms=5)
    ax.set_xticks(x)
    ax.set_xticklabels([n.upper() for n in NIAH_LENGTHS])
    ax.set_xlabel("prompt length (Gemma 3 tokens)")
    ax.set_ylabel("RULER NIAH string_match_all, % (8 tasks x 50)")
    ax.set_title("Gemma 3 270M, density 0.2, H100 bf16: 400 samples per point (paired SE about 0.5-1.4)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _paired_to_dense(run: Path, dense: Path) -> tuple[float, float, float] | None:
    """(mean difference to dense in points, its standard error, mean achieved density) over the
    samples both runs scored, matched by (task, length, index); None where the run is absent."""
    from flexwalk.niah.report.load import samples_path

    if samples_path(run) is None:
        return None
    base = {(r["task"], r["length"], r["index"]): r["score_all"] for r in _samples(dense)}
    rows = [r for r in _samples(run) if (r["task"], r["length"], r["index"]) in base]
    diffs = [r["score_all"] - base[(r["task"], r["length"], r["index"])] for r in rows]
    se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
    dens = [r["density"] for r in rows if r.get("density") is not None]
    return float(np.mean(diffs)), se, float(np.mean(dens)) if dens else 1.0


def qwen_figure(path: Path) -> None:
    """Qwen2.5-Coder-1.5B: each rule's paired difference to dense by prompt length, and the
    defaults' against achieved density."""
    root = DATA / "niah" / "qwen15b"
    lengths = ("4k", "8k", "16k", "32k")
    # (label, run directory, method, colour, style, lengths); the defaults ran at 4K-16K
    series = [("defaults: key extremes, one-hop, two local and two dense tail blocks", "{}-bound-local2-tail2",
               "sketchwalk", "tab:red", "-s", lengths[:3]),
              ("key extremes, two local blocks, one dense tail block", "{}-bound-local2", "sketchwalk", "tab:pink",
               "-.s", lengths),
              ("key extremes, one local block", "{}-bound", "sketchwalk", "tab:brown", "--s", lengths),
              ("key extremes, one local block, density 0.3", "{}-bound-density-0.3", "sketchwalk", "tab:orange", "--^", lengths),
              ("key extremes, one local block, density 0.1", "{}-bound-density-0.1", "sketchwalk", "tab:purple", "--v", lengths),
              ("mean keys, one-hop", "{}", "one_hop", "tab:blue", ":o", lengths),
              ("mean keys, walk across layers", "{}", "sketchwalk", "tab:gray", ":o", lengths),
              ("exact block ranking, one local block", "{}", "oracle", "k", "D", lengths),
              ("exact block ranking, two local blocks", "{}-oracle", "oracle", "dimgray", "d", lengths)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    x = np.arange(len(lengths))
    ax.axhspan(-1, 0, color="tab:green", alpha=0.10, label="target: within 1 point of dense")
    ax.axhline(0, color="k", lw=0.8)
    for label, run, method, color, style, at in series:
        pts = [(i, _paired_to_dense(root / run.format(n) / method, root / n / "sdpa")) for i, n in enumerate(lengths)
               if n in at]
        pts = [(i, v) for i, v in pts if v is not None]
        ax.errorbar([i for i, _ in pts], [v[0] for _, v in pts], yerr=[v[1] for _, v in pts], fmt=style,
                    color=color, label=label, ms=5, capsize=3, lw=1.2)
    ax.set_xticks(x)
    ax.set_xticklabels([n.upper() for n in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("RULER NIAH, points against dense (paired, +- 1 SE)")
    ax.set_title("Qwen2.5-Coder-1.5B, density 0.2 unless named, 8 tasks x 50", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.axhspan(-1, 0, color="tab:green", alpha=0.10)
    ax.axhline(0, color="k", lw=0.8)
    for n, color in (("4k", "tab:blue"), ("8k", "tab:orange"), ("16k", "tab:green"), ("32k", "tab:red")):
        runs = [f"{n}-bound-density-0.1", f"{n}-bound", f"{n}-bound-density-0.3"]
        pts = [v for v in (_paired_to_dense(root / r / "sketchwalk", root / n / "sdpa") for r in runs) if v is not None]
        ax.errorbar([v[2] for v in pts], [v[0] for v in pts], yerr=[v[1] for v in pts], fmt="-o", color=color,
                    label=f"{n.upper()}: one local block, density 0.1 / 0.2 / 0.3", ms=5, capsize=3)
        defaults = _paired_to_dense(root / f"{n}-bound-local2-tail2" / "sketchwalk", root / n / "sdpa")
        if defaults is not None:
            ax.errorbar([defaults[2]], [defaults[0]], yerr=[defaults[1]], fmt="*", color=color, ms=11, capsize=3,
                        label=f"{n.upper()}: defaults, density 0.2")
        else:  # 32K: two local blocks with one dense tail block, at density 0.2 and 0.3
            runs = [f"{n}-bound-local2", f"{n}-bound-local2-density-0.3"]
            pts = [v for v in (_paired_to_dense(root / r / "sketchwalk", root / n / "sdpa") for r in runs) if v is not None]
            ax.errorbar([v[2] for v in pts], [v[0] for v in pts], yerr=[v[1] for v in pts], fmt="-*", color=color,
                        ms=11, capsize=3, label=f"{n.upper()}: two local blocks, one tail block, density 0.2 / 0.3")
        for run, forced in ((root / n / "oracle", "one"), (root / f"{n}-oracle" / "oracle", "two")):
            oracle = _paired_to_dense(run, root / n / "sdpa")
            if oracle is not None:
                ax.errorbar([oracle[2]], [oracle[0]], yerr=[oracle[1]], fmt="D", color=color, mfc="white", capsize=3,
                            label=f"{n.upper()}: exact block ranking, {forced} local block{'s' if forced == 'two' else ''}")
    ax.set_xlabel("achieved density (kept / causal blocks, forced blocks included)")
    ax.set_ylabel("points against dense (paired, +- 1 SE)")
    ax.set_title("Qwen2.5-Coder-1.5B: the budget, H100/H200 bf16", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _fidelity_rows(path: Path, group: str = "density") -> list[tuple[float, float, float]]:
    """(achieved density, dense-mass recall, next-token KL) of one fidelity group.

    Reads a `flexwalk niah fidelity` table (OUT.md) or its progress log (lines `... {group} {...}:
    err E recall R density D kl K`).
    """
    import re

    rows = []
    for line in path.read_text().splitlines():
        if path.suffix == ".md" and line.startswith(f"| {group} |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append((float(cells[2]), float(cells[4]), float(cells[5])))
        m = re.search(rf" {group} \{{.*\}}: err \S+ recall (\S+) density (\S+) kl (\S+)", line)
        if m:
            rows.append((float(m[2]), float(m[1]), float(m[3])))
    return sorted(rows)


def density_accuracy_figure(path: Path) -> None:
    """SmolLM2: NIAH accuracy (400 samples per point) and fidelity against achieved density."""
    root = DATA / "niah" / "smollm2"

    def density(run: Path) -> float:
        values = [r["density"] for r in _samples(run) if r.get("density") is not None]
        return sum(values) / len(values)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    ax = axes[0]
    for length, runs, color in (("2K", ["2k", "2k-density0.3", "2k-density0.5"], "tab:blue"),
                                ("4K", ["4k"], "tab:orange"), ("8K", ["8k"], "tab:green")):
        dense = _niah_mean(root / runs[0] / "sdpa")
        ax.axhline(dense, color=color, lw=0.8, ls="--")
        pts = [(density(root / r / "sketchwalk"), _niah_mean(root / r / "sketchwalk")) for r in runs]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color, label=f"{length}: SketchWalk (dashed: sdpa)")
    oracle = root / "2k" / "oracle"
    ax.plot([density(oracle)], [_niah_mean(oracle)], "D", color="tab:red", label="2K: exact block ranking (oracle)")
    ax.set_xlabel("achieved density (kept / causal blocks)")
    ax.set_ylabel("RULER NIAH string_match_all, % (8 tasks x 50)")
    ax.set_title("SmolLM2-135M, H100 bf16", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax2 = ax.twinx()
    fid = DATA / "niah" / "fidelity"
    for label, f, color in (("2K (CPU, one prompt)", fid / "smollm2_2k_cpu.md", "tab:blue"),
                            ("8K (H100, one prompt)", fid / "smollm2_8k_h100.log", "tab:green")):
        rows = _fidelity_rows(f)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "-o", color=color, label=f"{label}: dense-mass recall")
        ax2.plot([r[0] for r in rows], [r[2] for r in rows], ":^", color=color, label=f"{label}: next-token KL")
    ax.set_xlabel("achieved density")
    ax.set_ylabel("share of the dense attention mass kept")
    ax2.set_ylabel("next-token KL to dense (nats)")
    ax.set_title("SmolLM2-135M fidelity, density 0.1 / 0.2 / 0.3 / 0.5", fontsize=10)
    ax.grid(True, alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="center right")
    _save(fig, path)


def decode_figure(path: Path) -> None:
    """Grouped bars: niah_single_1 / _2 accuracy per decode run, with a standard error bar."""
    root = DATA / "niah" / "smollm2" / "8k-decode_scoring"
    runs = [("sdpa", "sdpa", "k"),
            ("sparse prefill,\ndense decode", "dense_decode", "tab:gray"),
            ("sparse decode,\nblock means + pins", "sketch_pinned", "tab:blue"),
            ("sparse decode,\nkey bounds, no pins", "bound_unpinned", "tab:orange"),
            ("sparse decode,\nkey bounds + pins\n(its default)", "bound_pinned", "tab:red")]
    tasks = ("niah_single_1", "niah_single_2")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(runs)
    for r, (label, run, color) in enumerate(runs):
        samples = _samples(root / run)
        ys, ses = [], []
        for t in tasks:
            scores = [s["score_all"] for s in samples if s["task"] == t]
            y = sum(scores) / len(scores)
            ys.append(y)
            ses.append(100 * np.sqrt(y / 100 * (1 - y / 100) / len(scores)))
        xs = np.arange(len(tasks)) + (r - (len(runs) - 1) / 2) * width
        ax.bar(xs, ys, width, yerr=ses, color=color, label=label.replace("\n", " "), capsize=2)
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("string_match_all, % (50 samples)")
    ax.set_title("SmolLM2-135M, 8K prompts, H100 bf16, decode density 0.22", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


FIGURES = {
    "density": lambda args: density_figure(IMG / "density_vs_length.png"),
    "mask": lambda args: mask_figure(IMG / "block_mask_smollm2.png", args.length, args.depth),
    "speed": lambda args: speed_figure(IMG / "prefill_speedup_h100.png"),
    "share": lambda args: share_figure(IMG / "selection_share_h100.png"),
    "ttft": lambda args: ttft_figure(IMG / "ttft_tp_h200.png"),
    "gemma": lambda args: gemma_figure(IMG / "niah_gemma3_by_length.png"),
    "density_accuracy": lambda args: density_accuracy_figure(IMG / "accuracy_vs_density.png"),
    "qwen": lambda args: qwen_figure(IMG / "niah_qwen15b.png"),
    "decode": lambda args: decode_figure(IMG / "decode_scoring_smollm2.png"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=tuple(FIGURES))
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=0.4)
    args = parser.parse_args(argv)
    IMG.mkdir(parents=True, exist_ok=True)
    for name, make in FIGURES.items():
        if args.only in (None, name):
            make(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
