"""The report's PNG plots (matplotlib)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .load import FLEXWALK, RunResults

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def plots(report: dict[str, Any], runs: list[RunResults], out_dir: Path) -> list[str]:
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError("flexwalk niah compare needs matplotlib: pip install 'flexwalk[eval]'") from exc

    files: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        files.append(name)

    slugs: dict[str, str] = {}
    for model, mr in report["models"].items():
        slug = _slug(model)
        slugs[model] = slug if slug not in slugs.values() else f"{slug}_{len(slugs)}"
        methods, tasks, lengths = mr["methods"], mr["tasks"], mr["lengths"]
        acc = {(c["method"], c["task"], c["length"]): c["accuracy"] for c in mr["cells"]}
        # (a) accuracy by task x method, one panel per length
        fig = Figure(figsize=(min(24.0, max(6.0, 0.45 * len(tasks) * len(methods) + 2)), 2.8 * len(lengths)))
        width = 0.8 / len(methods)
        for i, L in enumerate(lengths):
            ax = fig.add_subplot(len(lengths), 1, i + 1)
            for j, m in enumerate(methods):
                xs = [k + j * width for k in range(len(tasks))]
                bars = ax.bar(xs, [acc.get((m, t, L), math.nan) for t in tasks], width, label=m)  # nan: no cell
                ax.bar_label(bars, fmt="{:.0f}", fontsize=6, padding=1)
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks, rotation=20, fontsize=7)
            ax.set_ylim(0, 122)
            ax.set_yticks(range(0, 101, 20))
            ax.set_ylabel("accuracy %")
            ax.set_title(f"{model}: {L} tokens", fontsize=9)
            ax.legend(fontsize=7, ncols=min(6, len(methods)), loc="upper center")
        save(fig, f"accuracy_by_task_{slugs[model]}.png")
        # (b) accuracy vs length per method
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for m in methods:
            pts = [(L, v["accuracy"]) for L in lengths if (v := mr["accuracy_by_method_length"][m].get(str(L)))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.minorticks_off()
        ax.set_xlabel("target length (tokens)")
        ax.set_ylabel("accuracy % (mean over tasks)")
        ax.set_ylim(0, 105)
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=8)
        save(fig, f"accuracy_vs_length_{slugs[model]}.png")
    # (c) accuracy vs achieved density, one point per (method, model, task, length) cell
    kind = {g: r for r in runs for g in r.groups}
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    markers = "os^Dv<>p*h"
    for mi, (model, mr) in enumerate(report["models"].items()):
        for m in mr["methods"]:
            run = kind[(m, model)]
            pts = [(c["density"] if c["density"] is not None else 1.0, c["accuracy"]) for c in mr["cells"]
                   if c["method"] == m and (c["density"] is not None or run.kind == FLEXWALK)]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[mi % len(markers)], alpha=0.7,
                           label=m if len(report["models"]) == 1 else f"{m} [{model}]")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-2, 105)
    ax.set_xlabel("achieved density (dense = 1.0)")
    ax.set_ylabel("accuracy %")
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_density.png")
    # (d) density per layer per method, prefill and decode
    fig = Figure(figsize=(10, 4))
    for i, phase in enumerate(("prefill", "decode")):
        ax = fig.add_subplot(1, 2, i + 1)
        drawn = False
        for r in runs:
            per = r.density_per_layer.get(phase) or {}
            if per:
                layers = sorted(per)
                m, model = r.groups[0]
                name = m if len(report["models"]) == 1 else f"{m} [{model}]"
                if sum((m, model) in o.groups for o in runs) > 1:  # one run per length: say which
                    name += " @ " + ",".join(str(n) for n in sorted({s.length for s in r.samples}))
                ax.plot(layers, [per[k] for k in layers], marker=".", label=name)
                drawn = True
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{phase} density per layer", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("achieved density")
        ax.set_ylim(0, 1.05)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no per-layer density recorded", ha="center", va="center", transform=ax.transAxes)
    save(fig, "density_per_layer.png")
    return files
