"""RULER's scoring: prediction cleanup, string_match_all / string_match_part, task -> metric.

Same definitions as NVIDIA/RULER `scripts/eval/synthetic/constants.py` and
`scripts/eval/evaluate.py`:

- `postprocess_pred`: strip, turn every control character (\\x00-\\x1f) into a newline, strip.
- `string_match_all` (niah, variable_tracking, common_words_extraction, freq_words_extraction):
  per sample the fraction of references found in the prediction; mean over samples x 100,
  rounded to 2 decimals.
- `string_match_part` (qa): per sample 1 if any reference is found, else 0; mean x 100, rounded.

"Found" is a case-insensitive substring test (`r.lower() in pred.lower()`): no tokenisation,
no punctuation stripping.  RULER cleans the predictions before scoring; the list metrics here
score what they are given (as RULER's do), `score_prediction` cleans then scores.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")

# RULER's synthetic.yaml: task name -> base task, in RULER's order.
RULER_TASKS: dict[str, str] = {
    "niah_single_1": "niah",
    "niah_single_2": "niah",
    "niah_single_3": "niah",
    "niah_multikey_1": "niah",
    "niah_multikey_2": "niah",
    "niah_multikey_3": "niah",
    "niah_multivalue": "niah",
    "niah_multiquery": "niah",
    "vt": "variable_tracking",
    "cwe": "common_words_extraction",
    "fwe": "freq_words_extraction",
    "qa_1": "qa",
    "qa_2": "qa",
}
ALL, PART = "string_match_all", "string_match_part"
# RULER's constants.TASKS: base task -> metric.
BASE_TASK_METRIC: dict[str, str] = {
    "niah": ALL,
    "variable_tracking": ALL,
    "common_words_extraction": ALL,
    "freq_words_extraction": ALL,
    "qa": PART,
}
_PREFIXES = (("niah", "niah"), ("qa", "qa"), ("vt", "variable_tracking"), ("cwe", "common_words_extraction"),
             ("fwe", "freq_words_extraction"))


def postprocess_pred(pred: str) -> str:
    """RULER's cleanup of a prediction (evaluate.py's postprocess_pred, default path)."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def _hits(pred: str, refs: Sequence[str]) -> list[float]:
    if isinstance(refs, str) or len(refs) == 0:
        raise ValueError(f"references={refs!r} must be a non-empty list of strings")
    low = pred.lower()
    return [1.0 if r.lower() in low else 0.0 for r in refs]


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if isinstance(preds, str) or len(preds) == 0:
        raise ValueError(f"preds={preds!r} must be a non-empty list of strings")
    if len(preds) != len(refs):
        raise ValueError(
            f"preds has {len(preds)} entries but refs has {len(refs)}: must be one reference list per prediction"
        )


def string_match_all_per_sample(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
    """Each sample's string_match_all score, 0-100 (100 x fraction of its references found), unrounded."""
    _check(preds, refs)
    out = []
    for p, r in zip(preds, refs):
        h = _hits(p, r)
        out.append(sum(h) / len(h) * 100)
    return out


def string_match_part_per_sample(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
    """Each sample's string_match_part score, 0 or 100 (100 if any reference is found)."""
    _check(preds, refs)
    return [max(_hits(p, r)) * 100 for p, r in zip(preds, refs)]


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_all over a task: 0-100, rounded to 2 decimals."""
    _check(preds, refs)
    total = sum(sum(h) / len(h) for h in (_hits(p, r) for p, r in zip(preds, refs)))
    return round(total / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_part over a task: 0-100, rounded to 2 decimals."""
    _check(preds, refs)
    total = sum(max(_hits(p, r)) for p, r in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    ALL: string_match_all,
    PART: string_match_part,
}


def base_task(task: str) -> str:
    """RULER base task of a task name: RULER_TASKS, a base task name itself, or its prefix (niah_*, qa_*...)."""
    if task in RULER_TASKS:
        return RULER_TASKS[task]
    if task in BASE_TASK_METRIC:
        return task
    for prefix, base in _PREFIXES:
        if task == prefix or task.startswith(prefix + "_"):
            return base
    raise ValueError(
        f"task={task!r} is not a RULER task: must be one of {sorted(RULER_TASKS)}, a base task "
        f"{sorted(BASE_TASK_METRIC)} or start with niah_, qa_, vt_, cwe_ or fwe_"
    )


def metric_name(task: str) -> str:
    """The metric RULER scores `task` with: 'string_match_all' or 'string_match_part'."""
    return BASE_TASK_METRIC[base_task(task)]


def score_task(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's task score (0-100, 2 decimals): postprocess_pred, then the task's metric."""
    return METRICS[metric_name(task)]([postprocess_pred(p) for p in preds], refs)


def score_prediction(pred: str, refs: Sequence[str]) -> tuple[float, float]:
    """(string_match_all, string_match_part) of one raw prediction, each 0-100, after postprocess_pred.

    The means of these per-sample scores over a task equal RULER's task scores before rounding.
    """
    clean = postprocess_pred(pred)
    return string_match_all_per_sample([clean], [refs])[0], string_match_part_per_sample([clean], [refs])[0]
