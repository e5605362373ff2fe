"""`compare`: result paths -> report.md, report.json and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .load import RULER, load_run
from .markdown import markdown
from .plots import plots
from .summary import DEFAULT_MIN_SAMPLES, model_report

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
        "models": {model: model_report([s for s in samples if s.model == model], methods, baseline, min_samples)
                   for model in models},
        "notes": notes,
        "plots": [],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(report, runs, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    return report
