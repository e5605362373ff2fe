"""Loading result paths into scored samples: flexwalk run directories and RULER prediction roots."""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import (
    ALL,
    PART,
    metric_name,
    postprocess_pred,
    score_task,
    string_match_all_per_sample,
    string_match_part_per_sample,
)

FLEXWALK, RULER = "flexwalk", "ruler"
# A run directory's per-sample records: as `flexwalk niah run` writes them, or gzip-compressed
# (the recorded runs under docs/data are stored so).
SAMPLE_FILES = ("samples.jsonl", "samples.jsonl.gz")


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def samples_path(run_dir: str | Path) -> Path | None:
    """The per-sample file of a flexwalk run directory (SAMPLE_FILES, plain first), or None."""
    for name in SAMPLE_FILES:
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-sample rows of a flexwalk run directory, plain or gzip-compressed."""
    path = samples_path(run_dir)
    if path is None:
        raise FileNotFoundError(f"{str(run_dir)!r} holds none of {', '.join(SAMPLE_FILES)}")
    return _read_jsonl(path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
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
    sample_file = samples_path(path)
    for row in read_samples(path):
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
                f"{sample_file}: sample {row!r:.200} lacks or mistypes a field ({exc!r})"
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
    if path.is_dir() and (path / "run.json").is_file() and samples_path(path) is not None:
        run = _load_flexwalk(path, method, model)
    elif path.is_dir() and (preds := _ruler_pred_dirs(path)):
        run = _load_ruler(path, preds, method, model)
    else:
        raise ValueError(
            f"result path {str(path)!r} is neither a flexwalk NIAH run directory (run.json + samples.jsonl[.gz]) "
            "nor a RULER prediction root (<model>/<benchmark>/<length>/pred/<task>.jsonl)"
        )
    if not run.samples:
        raise ValueError(f"result path {str(path)!r} holds no scored samples")
    return run
