"""Aggregation of scored samples: cells per (method, task, length), means per method and length,
and paired differences to the baseline."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Iterable

from ..metrics import RULER_TASKS
from .load import SampleRecord

DEFAULT_MIN_SAMPLES = 50


def mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def median(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def task_order(task: str) -> tuple[int, str]:
    order = list(RULER_TASKS)
    return (order.index(task), task) if task in order else (len(order), task)


def _cell(samples: list[SampleRecord], min_samples: int) -> dict[str, Any]:
    return {
        "n": len(samples),
        "accuracy": statistics.fmean(s.score for s in samples),
        "string_match_all": statistics.fmean(s.score_all for s in samples),
        "string_match_part": statistics.fmean(s.score_part for s in samples),
        "density": mean(s.density for s in samples),
        "prefill_s": median(s.prefill_s for s in samples),
        "decode_s": median(s.decode_s for s in samples),
        "under_powered": len(samples) < min_samples,
    }


def model_report(samples: list[SampleRecord], methods: list[str], baseline: str,
                  min_samples: int) -> dict[str, Any]:
    groups: dict[tuple[str, str, int], list[SampleRecord]] = defaultdict(list)
    for s in samples:
        groups[(s.method, s.task, s.length)].append(s)
    cells = {k: _cell(v, min_samples) for k, v in groups.items()}
    methods = [m for m in methods if any(k[0] == m for k in cells)]
    tasks = sorted({k[1] for k in cells}, key=task_order)
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
                acc, t = min(present, key=lambda x: (x[0], task_order(x[1])))
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
                    loss = min(ds, key=lambda d: (d["delta"], task_order(d["task"])))
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
                timing[m][str(L)] = {"n": len(ts), "prefill_s": median(s.prefill_s for s in ts),
                                     "decode_s": median(s.decode_s for s in ts),
                                     "density": mean(s.density for s in ts)}
    return {
        "methods": methods, "tasks": tasks, "lengths": lengths,
        "cells": [{"method": k[0], "task": k[1], "length": k[2], **v} for k, v in sorted(
            cells.items(), key=lambda kv: (methods.index(kv[0][0]), task_order(kv[0][1]), kv[0][2]))],
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
