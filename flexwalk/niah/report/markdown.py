"""report.md: the report dict as Markdown tables."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

UNDER = "†"  # marks a value resting on at least one cell with fewer than min_samples samples


def _fmt(x: float | None, digits: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def accuracy_text(v: dict[str, Any] | None) -> str:
    return "" if v is None else _fmt(v["accuracy"]) + (f" {UNDER}" if v["under_powered"] else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
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
            (m, *(accuracy_text(mr["accuracy_by_method_length"][m].get(L)) for L in lengths + ["avg"])) for m in methods))
        out += ["### Accuracy by task and method (mean over lengths)", ""]
        out += _table(("task", *methods), ((t, *(accuracy_text(mr["accuracy_by_task_method"][t][m]) for m in methods))
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
