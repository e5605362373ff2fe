"""Comparison reports over NIAH runs: `flexwalk niah compare RUN [RUN ...] --out DIR`.

A result path is either a flexwalk run directory (run.json + samples.jsonl [+ summary.json])
or a RULER prediction root (`<model>/<benchmark>/<length>/pred/<task>.jsonl`, any level of it),
scored here with RULER's own rule per task.  `compare` writes report.md, report.json and PNG
plots; see docs/niah-report.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .metrics import (
    ALL,
    PART,
    RULER_TASKS,
    metric_name,
    postprocess_pred,
    score_task,
    string_match_all_per_sample,
    string_match_part_per_sample,
)

FLEXWALK, RULER = "flexwalk", "ruler"
DEFAULT_MIN_SAMPLES = 50
UNDER = "†"  # marks a value resting on at least one cell with fewer than min_samples samples


@dataclass(frozen=True)
class SampleRecord:
    """One scored sample.  Scores 0-100; `score` is RULER's metric for the task (all or part)."""

    method: str
    model: str
    task: str
    length: int
    index: int
    score: float
    score_all: float
    score_part: float
    density: float | None
    prefill_s: float | None
    decode_s: float | None


@dataclass
class RunResults:
    """The samples of one result path, normalised.  `dense`: True/False for flexwalk runs, None for RULER."""

    path: Path
    kind: str
    samples: list[SampleRecord]
    info: dict[str, Any]
    dense: bool | None
    density_per_layer: dict[str, dict[int, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[tuple[str, str]]:
        """The (method, model) pairs of this path, in order of appearance."""
        return list(dict.fromkeys((s.method, s.model) for s in self.samples))


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not a JSON line ({exc.msg})") from None
    return rows


def _split_label(label: str | None) -> tuple[str | None, str | None]:
    """'method' or 'method@model' -> (method, model); empty parts mean 'keep the default'."""
    if not label:
        return None, None
    method, _, model = label.partition("@")
    return method or None, model or None


def _metric_of(task: str, notes: list[str]) -> str:
    try:
        return metric_name(task)
    except ValueError:
        notes.append(f"task {task!r} is not a RULER task name: scored with string_match_all")
        return ALL


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _load_flexwalk(path: Path, method: str | None, model: str | None) -> RunResults:
    info = _read_json(path / "run.json")
    method = method or str(info.get("method", path.name))
    model = model or str(info.get("model", "?"))
    notes: list[str] = []
    metrics: dict[str, str] = {}
    by_key: dict[tuple[str, int, int], SampleRecord] = {}
    for row in _read_jsonl(path / "samples.jsonl"):
        try:
            task, length = str(row["task"]), int(row["length"])
            if task not in metrics:
                metrics[task] = _metric_of(task, notes)
            s_all, s_part = float(row["score_all"]), float(row["score_part"])
            rec = SampleRecord(
                method, model, task, length, int(row["index"]), s_part if metrics[task] == PART else s_all,
                s_all, s_part, _opt_float(row.get("density")), _opt_float(row.get("prefill_s")),
                _opt_float(row.get("decode_s")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path / 'samples.jsonl'}: sample {row!r:.200} lacks or mistypes a field ({exc!r})"
            ) from None
        key = (task, length, rec.index)
        if key in by_key:
            notes.append(f"{path.name}: sample {key} appears more than once; the last one is kept")
        by_key[key] = rec
    samples = list(by_key.values())
    per_layer: dict[str, dict[int, float]] = {}
    summary = path / "summary.json"
    if summary.is_file():
        raw = _read_json(summary).get("density_per_layer") or {}
        per_layer = {ph: {int(k): float(v) for k, v in (d or {}).items() if v is not None} for ph, d in raw.items()}
    dense = info.get("config") is None and all(s.density is None for s in samples)
    return RunResults(path, FLEXWALK, samples, info, dense, per_layer, notes)


def _ruler_pred_dirs(path: Path) -> list[Path]:
    if path.name == "pred" and any(path.glob("*.jsonl")):
        return [path]
    return sorted(p for p in path.rglob("pred") if p.is_dir() and any(p.glob("*.jsonl")))


def _ruler_task_files(pred: Path) -> dict[str, list[Path]]:
    """task -> its files; chunked predictions (`<task>-<k>.jsonl`) replace `<task>.jsonl` as in evaluate.py."""
    whole: dict[str, list[Path]] = {}
    chunks: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(pred.glob("*.jsonl")):
        if re.match(r".*[^_]+-\d+\.jsonl$", f.name):
            chunks["-".join(f.name.split("-")[:-1])].append(f)
        else:
            whole[f.stem] = [f]
    return {**whole, **chunks}


def _ruler_summary(pred: Path) -> dict[str, float]:
    """Task scores of RULER's summary.csv (rows 'Tasks', 'Score', 'Nulls'), if there is one."""
    out: dict[str, float] = {}
    for f in sorted(pred.glob("summary*.csv")):
        with f.open(newline="", encoding="utf-8") as fh:
            rows = {r[0]: r[1:] for r in csv.reader(fh) if r}
        for task, score in zip(rows.get("Tasks", []), rows.get("Score", [])):
            try:
                out[task] = float(score)
            except ValueError:
                pass
    return out


def _load_ruler(path: Path, preds: list[Path], method: str | None, model: str | None) -> RunResults:
    samples: list[SampleRecord] = []
    notes: list[str] = []
    models = []
    for pred in preds:
        try:
            length = int(pred.parent.name)
        except ValueError:
            raise ValueError(
                f"{pred}: cannot tell the target length: a RULER prediction directory must be "
                "<model>/<benchmark>/<length>/pred with an integer <length>"
            ) from None
        model_name = model or pred.parents[2].name
        models.append(model_name)
        summary = _ruler_summary(pred)
        for task, files in _ruler_task_files(pred).items():
            try:
                metric = metric_name(task)
            except ValueError:
                notes.append(f"{pred}: {task}.jsonl skipped: not a RULER task (RULER's evaluate.py skips it too)")
                continue
            rows = [r for f in files for r in _read_jsonl(f)]
            try:
                raw = [str(r["pred"]) for r in rows]
                refs = [list(r.get("outputs", [r.get("output", "")])) for r in rows]
                idx = [int((r.get("others") or {}).get("id", r["index"])) for r in rows]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{files[0]}: a RULER prediction line lacks 'pred', 'outputs' or 'index' ({exc!r})"
                ) from None
            if not rows:
                continue
            clean = [postprocess_pred(p) for p in raw]
            s_all = string_match_all_per_sample(clean, refs)
            s_part = string_match_part_per_sample(clean, refs)
            for i, a, p in zip(idx, s_all, s_part):
                score = p if metric == PART else a
                samples.append(SampleRecord(method or model_name, model_name, task, length, i, score, a, p,
                                            None, None, None))
            if task in summary and abs(summary[task] - (ours := score_task(task, raw, refs))) > 0.01:
                notes.append(f"{pred}: {task}: RULER's summary.csv says {summary[task]:.2f}, these predictions "
                             f"score {ours:.2f} (the report uses the latter)")
    info = {"model": ", ".join(dict.fromkeys(models)), "method": method, "benchmark": preds[0].parents[1].name}
    return RunResults(path, RULER, samples, info, None, {}, notes)


def load_run(path: str | Path, label: str | None = None) -> RunResults:
    """Load a flexwalk run directory or a RULER prediction root (auto-detected).

    label: 'method' or 'method@model' overriding the method label (default: run.json's method,
    or the RULER model directory name) and the model name (to line a RULER model up with ours).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"result path {str(path)!r} does not exist: must be a flexwalk NIAH run directory or a RULER prediction root"
        )
    method, model = _split_label(label)
    if path.is_dir() and (path / "run.json").is_file() and (path / "samples.jsonl").is_file():
        run = _load_flexwalk(path, method, model)
    elif path.is_dir() and (preds := _ruler_pred_dirs(path)):
        run = _load_ruler(path, preds, method, model)
    else:
        raise ValueError(
            f"result path {str(path)!r} is neither a flexwalk NIAH run directory (run.json + samples.jsonl) "
            "nor a RULER prediction root (<model>/<benchmark>/<length>/pred/<task>.jsonl)"
        )
    if not run.samples:
        raise ValueError(f"result path {str(path)!r} holds no scored samples")
    return run


# ----------------------------------------------------------------------------- aggregation


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def _median(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _task_order(task: str) -> tuple[int, str]:
    order = list(RULER_TASKS)
    return (order.index(task), task) if task in order else (len(order), task)


def _cell(samples: list[SampleRecord], min_samples: int) -> dict[str, Any]:
    return {
        "n": len(samples),
        "accuracy": statistics.fmean(s.score for s in samples),
        "string_match_all": statistics.fmean(s.score_all for s in samples),
        "string_match_part": statistics.fmean(s.score_part for s in samples),
        "density": _mean(s.density for s in samples),
        "prefill_s": _median(s.prefill_s for s in samples),
        "decode_s": _median(s.decode_s for s in samples),
        "under_powered": len(samples) < min_samples,
    }


def _model_report(samples: list[SampleRecord], methods: list[str], baseline: str,
                  min_samples: int) -> dict[str, Any]:
    groups: dict[tuple[str, str, int], list[SampleRecord]] = defaultdict(list)
    for s in samples:
        groups[(s.method, s.task, s.length)].append(s)
    cells = {k: _cell(v, min_samples) for k, v in groups.items()}
    methods = [m for m in methods if any(k[0] == m for k in cells)]
    tasks = sorted({k[1] for k in cells}, key=_task_order)
    lengths = sorted({k[2] for k in cells})

    def over(method: str, keys: Iterable[tuple[str, str, int]]) -> dict[str, Any] | None:
        cs = [cells[k] for k in keys if k in cells]
        if not cs:
            return None
        return {"accuracy": statistics.fmean(c["accuracy"] for c in cs), "n": sum(c["n"] for c in cs),
                "under_powered": any(c["under_powered"] for c in cs)}

    by_length = {m: {str(L): over(m, [(m, t, L) for t in tasks]) for L in lengths} for m in methods}
    for m in methods:
        vals = [v for v in by_length[m].values() if v]
        by_length[m]["avg"] = {"accuracy": statistics.fmean(v["accuracy"] for v in vals),
                               "n": sum(v["n"] for v in vals), "under_powered": any(v["under_powered"] for v in vals)}
    by_task = {t: {m: over(m, [(m, t, L) for L in lengths]) for m in methods} for t in tasks}
    worst: dict[str, dict[str, Any]] = {}
    for m in methods:
        worst[m] = {}
        for L in lengths:
            present = [(cells[(m, t, L)]["accuracy"], t) for t in tasks if (m, t, L) in cells]
            if present:
                acc, t = min(present, key=lambda x: (x[0], _task_order(x[1])))
                worst[m][str(L)] = {"task": t, "accuracy": acc, "n": cells[(m, t, L)]["n"]}
    delta_cells, delta = [], {}
    if baseline in methods:
        for m in methods:
            if m == baseline:
                continue
            delta[m] = {}
            for L in lengths:
                ds = []
                for t in tasks:
                    a, b = cells.get((m, t, L)), cells.get((baseline, t, L))
                    if a and b:
                        ds.append({"method": m, "task": t, "length": L, "accuracy": a["accuracy"],
                                   "baseline": b["accuracy"], "delta": a["accuracy"] - b["accuracy"], "n": a["n"],
                                   "n_baseline": b["n"], "under_powered": a["under_powered"] or b["under_powered"]})
                delta_cells += ds
                if ds:
                    loss = min(ds, key=lambda d: (d["delta"], _task_order(d["task"])))
                    delta[m][str(L)] = {"delta": statistics.fmean(d["delta"] for d in ds), "tasks": len(ds),
                                        "under_powered": any(d["under_powered"] for d in ds),
                                        "worst_task": loss["task"], "worst_delta": loss["delta"]}
            if delta[m]:
                vals = list(delta[m].values())
                delta[m]["avg"] = {"delta": statistics.fmean(v["delta"] for v in vals),
                                   "tasks": sum(v["tasks"] for v in vals),
                                   "under_powered": any(v["under_powered"] for v in vals)}
    paired = _paired(samples, methods, baseline, lengths) if baseline in methods else {}
    timing: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for m in methods:
        for L in lengths:
            ts = [s for s in samples if s.method == m and s.length == L]
            if ts:
                timing[m][str(L)] = {"n": len(ts), "prefill_s": _median(s.prefill_s for s in ts),
                                     "decode_s": _median(s.decode_s for s in ts),
                                     "density": _mean(s.density for s in ts)}
    return {
        "methods": methods, "tasks": tasks, "lengths": lengths,
        "cells": [{"method": k[0], "task": k[1], "length": k[2], **v} for k, v in sorted(
            cells.items(), key=lambda kv: (methods.index(kv[0][0]), _task_order(kv[0][1]), kv[0][2]))],
        "accuracy_by_method_length": by_length, "accuracy_by_task_method": by_task, "worst_task": worst,
        "baseline": baseline if baseline in methods else None,
        "delta_by_method_length": delta, "delta_cells": delta_cells, "paired": paired,
        "timing": timing,
    }


def _paired_stats(diffs: list[float]) -> dict[str, Any]:
    n = len(diffs)
    return {"pairs": n, "delta": statistics.fmean(diffs),
            "se": statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None,
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}


def _paired(samples: list[SampleRecord], methods: list[str], baseline: str,
            lengths: list[int]) -> dict[str, dict[str, Any]]:
    """Each method against the baseline on the samples both scored: (task, length, index) matched.

    Per length and pooled ("all"): the mean per-sample score difference in points, its standard
    error (sample standard deviation of the differences / sqrt(pairs)), and how many samples scored
    higher or lower.  Pairing removes the between-sample variance that the cell deltas carry.
    """
    score = defaultdict(dict)
    for s in samples:
        score[s.method][(s.task, s.length, s.index)] = s.score
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        if m == baseline:
            continue
        base = score[baseline]
        diffs = {L: [] for L in lengths}
        for key, v in score[m].items():
            if key in base:
                diffs[key[1]].append(v - base[key])
        res = {str(L): _paired_stats(d) for L, d in diffs.items() if d}
        if res:
            res["all"] = _paired_stats([x for d in diffs.values() for x in d])
            out[m] = res
    return out


# ----------------------------------------------------------------------------- markdown


def _fmt(x: float | None, digits: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _acc(v: dict[str, Any] | None) -> str:
    return "" if v is None else _fmt(v["accuracy"]) + (f" {UNDER}" if v["under_powered"] else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _markdown(report: dict[str, Any]) -> str:
    base, ms = report["baseline"], report["min_samples"]
    out = ["# NIAH comparison", ""]
    out += _table(("method", "model", "source", "samples", "dense", "path"), (
        (r["method"], r["model"], r["kind"], str(r["samples"]),
         {True: "yes", False: "no", None: "unknown"}[r["dense"]], f"`{r['path']}`") for r in report["runs"]))
    out += [
        "Accuracy is RULER's metric for each task (string_match_all for niah, vt, cwe and fwe; string_match_part "
        "for qa), in %, the mean over the samples of a (method, task, length) cell.  Means over tasks or lengths "
        f"weight every cell equally.  Baseline: `{base}`.  {UNDER} marks a value resting on a cell with fewer than "
        f"{ms} samples (under-powered).", "",
    ]
    for model, mr in report["models"].items():
        lengths = [str(L) for L in mr["lengths"]]
        methods = mr["methods"]
        out += [f"## Model `{model}`", "", "### Accuracy by method and length (mean over tasks)", ""]
        out += _table(("method", *lengths, "avg"), (
            (m, *(_acc(mr["accuracy_by_method_length"][m].get(L)) for L in lengths + ["avg"])) for m in methods))
        out += ["### Accuracy by task and method (mean over lengths)", ""]
        out += _table(("task", *methods), ((t, *(_acc(mr["accuracy_by_task_method"][t][m]) for m in methods))
                                          for t in mr["tasks"]))
        out += ["### Worst task per method and length", ""]
        out += _table(("method", *lengths), ((m, *(
            f"{w['task']} ({_fmt(w['accuracy'])}, n={w['n']})" if (w := mr["worst_task"][m].get(L)) else ""
            for L in lengths)) for m in methods))
        if mr["baseline"] is None:
            out += [f"Baseline `{base}` has no samples for this model: no deltas.", ""]
        else:
            out += [f"### Delta to baseline `{base}` (mean over the tasks both have)", ""]
            out += _table(("method", *lengths, "avg"), (
                (m, *(_fmt(v["delta"], signed=True) + (f" {UNDER}" if v["under_powered"] else "") if (v := d.get(L))
                      else "n/a" for L in lengths + ["avg"]))
                for m, d in mr["delta_by_method_length"].items()))
            out += [f"### Largest loss to baseline `{base}` per method and length (the task with the lowest delta)", ""]
            out += _table(("method", *lengths), (
                (m, *(f"{v['worst_task']} ({_fmt(v['worst_delta'], signed=True)})" if (v := d.get(L)) else ""
                      for L in lengths)) for m, d in mr["delta_by_method_length"].items()))
            out += [f"### Delta to baseline `{base}` per cell", ""]
            out += _table(("method", "task", "length", "accuracy", "baseline", "delta", "n", "n baseline"), (
                (c["method"], c["task"], str(c["length"]), _fmt(c["accuracy"]), _fmt(c["baseline"]),
                 _fmt(c["delta"], signed=True) + (f" {UNDER}" if c["under_powered"] else ""), str(c["n"]),
                 str(c["n_baseline"])) for c in mr["delta_cells"]))
            out += [f"### Paired difference to baseline `{base}` (the same samples, points)", ""]
            out += _table(("method", "length", "pairs", "delta", "SE", "better", "worse"), (
                (m, L, str(v["pairs"]), _fmt(v["delta"], signed=True), _fmt(v["se"]), str(v["better"]),
                 str(v["worse"])) for m, d in mr["paired"].items() for L, v in d.items()))
            out += ["Each sample's score minus the baseline's on the same sample (task, length and index matched), "
                    "averaged; SE is the standard error of that mean; `better` / `worse` count the samples that "
                    "scored higher / lower than the baseline.", ""]
        out += ["### Time and density per method (median seconds per sample, mean achieved density)", ""]
        out += _table(("method", "length", "n", "prefill s", "decode s", "density"), (
            (m, L, str(t["n"]), _fmt(t["prefill_s"], 3), _fmt(t["decode_s"], 3), _fmt(t["density"], 3))
            for m in methods for L, t in mr["timing"][m].items()))
    under = [(model, c) for model, mr in report["models"].items() for c in mr["cells"] if c["under_powered"]]
    out += [f"## Under-powered cells (fewer than {ms} samples)", ""]
    out += _table(("model", "method", "task", "length", "n"), (
        (model, c["method"], c["task"], str(c["length"]), str(c["n"])) for model, c in under
    )) if under else ["None.", ""]
    if report["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    out += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _plots(report: dict[str, Any], runs: list[RunResults], out_dir: Path) -> list[str]:
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


# ----------------------------------------------------------------------------- compare


def compare(paths: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str | None] | None = None,
            baseline: str | None = None, min_samples: int = DEFAULT_MIN_SAMPLES) -> dict[str, Any]:
    """Compare result paths; write report.md, report.json and PNG plots to out_dir; return the report dict.

    labels: one per path, 'method' or 'method@model' (None or '' keeps the default).
    baseline: the method the deltas are taken to (default: 'sdpa' if present, else the first dense run,
    else the first run).  min_samples: cells with fewer samples are flagged under-powered.
    """
    if not paths:
        raise ValueError("paths is empty: give at least one result path")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(
            f"labels={list(labels)!r} has {len(labels)} entries for {len(paths)} paths: must be one per path"
        )
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ValueError(f"min_samples={min_samples!r} must be an int >= 1")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    # One method of one model may come from several paths (e.g. one run per length), as long
    # as no (task, length) cell comes from two of them.
    owner: dict[tuple[str, str, str, int], Path] = {}
    for r in runs:
        for cell in dict.fromkeys((s.method, s.model, s.task, s.length) for s in r.samples):
            if cell in owner:
                raise ValueError(
                    f"method label {cell[0]!r} of model {cell[1]!r} has {cell[2]} at length {cell[3]} in both "
                    f"{str(owner[cell])!r} and {str(r.path)!r}: give distinct labels (--labels)"
                )
            owner[cell] = r.path
    methods = list(dict.fromkeys(g[0] for r in runs for g in r.groups))
    if baseline is None:
        dense = [g[0] for r in runs if r.dense for g in r.groups]
        baseline = "sdpa" if "sdpa" in methods else (dense or methods)[0]
    elif baseline not in methods:
        raise ValueError(f"baseline={baseline!r} is not a method label of these runs: must be one of {methods}")
    samples = [s for r in runs for s in r.samples]
    models = list(dict.fromkeys(s.model for s in samples))
    notes = [n for r in runs for n in dict.fromkeys(r.notes)]
    if any(r.kind == RULER for r in runs):
        notes.append("RULER prediction directories record no density or timings: left out of the density plot, "
                     "n/a in the timing table")
    report: dict[str, Any] = {
        "baseline": baseline,
        "min_samples": min_samples,
        "runs": [{"path": str(r.path), "kind": r.kind, "method": m, "model": model, "dense": r.dense,
                  "samples": sum(1 for s in r.samples if (s.method, s.model) == (m, model)),
                  "info": r.info} for r in runs for m, model in r.groups],
        "models": {model: _model_report([s for s in samples if s.model == model], methods, baseline, min_samples)
                   for model in models},
        "notes": notes,
        "plots": [],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = _plots(report, runs, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


# ----------------------------------------------------------------------------- argparse

from ..cli import _positive_int  # noqa: E402  (one parser of positive ints for every command)




def _labels(text: str) -> list[str]:
    return [v.strip() for v in text.split(",")]


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `flexwalk niah compare` (run it with compare_main)."""
    parser.add_argument("paths", nargs="+", type=Path, metavar="RESULT",
                        help="flexwalk run directories (run.json + samples.jsonl) or RULER prediction roots")
    parser.add_argument("--out", type=Path, default=Path("niah-report"),
                        help="directory for report.md, report.json and the plots (default: %(default)s)")
    parser.add_argument("--labels", type=_labels, default=None,
                        help="comma-separated method label per result, 'label' or 'label@model' (empty keeps the "
                        "run's method, or the RULER model directory name)")
    parser.add_argument("--baseline", default=None,
                        help="method label deltas are taken to (default: sdpa if present, else the first dense run)")
    parser.add_argument("--min-samples", type=_positive_int, default=DEFAULT_MIN_SAMPLES,
                        help="cells with fewer samples are flagged under-powered (default: %(default)s)")
    return parser


def compare_main(args: argparse.Namespace) -> int:
    """Run `flexwalk niah compare`; 0 on success, 2 on a bad argument or result path."""
    if args.labels is not None and len(args.labels) != len(args.paths):
        print(f"flexwalk niah compare: error: --labels={','.join(args.labels)!r} has {len(args.labels)} entries "
              f"for {len(args.paths)} result paths: must be one per path (an empty entry keeps the default)",
              file=sys.stderr)
        return 2
    try:
        report = compare(args.paths, args.out, args.labels, args.baseline, args.min_samples)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"flexwalk niah compare: error: {exc}", file=sys.stderr)
        return 2
    for model, mr in report["models"].items():
        print(f"{model}: accuracy by method (mean over tasks and lengths)")
        for m in mr["methods"]:
            print(f"  {m:>20}  {_acc(mr['accuracy_by_method_length'][m]['avg'])}")
    print(f"wrote {Path(args.out) / 'report.md'}, report.json and {len(report['plots'])} plots")
    return 0
