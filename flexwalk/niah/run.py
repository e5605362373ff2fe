"""Evaluate attention methods on RULER NIAH data with one model (`flexwalk niah run`, niah.cli).

One run directory per method (the format flexwalk.niah.report reads, docs/niah-report.md):

    OUT/<method>/run.json       model, method, SketchWalk config, device, versions, data
    OUT/<method>/samples.jsonl  one line per sample, appended as it finishes (resumable)
    OUT/<method>/summary.json   per (task, length) cells, overall, density per layer
    OUT/<method>/summary.csv

Methods (all share one loaded model; the attention implementation is switched per method):
  sdpa        dense, attn_implementation="sdpa" (the baseline)
  flex        dense through sketchwalk_flex at full budget (every causal block kept)
  sketchwalk  the SketchWalk configuration (preset + flags)
  one_hop     the same with walk="one_hop" (no walk across layers)
  walk        the same with walk="damped" (the walk across layers)
  oracle      the same budget, blocks ranked by exact block attention mass (upper bound;
              prefill only, O(n^2) per layer)
Decoding is greedy; with --sparse-decode, sketchwalk, one_hop and walk decode sparsely too.  With
--batch-size N, up to N samples of one task and length are decoded together (left-padded;
sparse methods batch only prompts of one token count), see docs/niah.md.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import stats
from ..config import SketchWalkConfig
from ..generation import eos_ids, greedy_batch, pad_id
from ..integrations.transformers import configure, reset_decode_state
from .dataset import dataset_path, read_jsonl
from .metrics import score_prediction
from .report.summary import mean  # mean of the non-None values, as the report computes it

METHODS = ("sdpa", "flex", "sketchwalk", "one_hop", "walk", "oracle")
DENSE_METHODS = ("sdpa", "flex")


def method_config(method: str, base: SketchWalkConfig, sparse_decode: bool = False) -> SketchWalkConfig | None:
    """The SketchWalk configuration a method runs with (None: sdpa)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known: allowed {', '.join(METHODS)}")
    if method == "sdpa":
        return None
    if method == "flex":
        return base.replace(density=1.0, top_k_blocks=None, skip_decode=True, skip_prefill=False)
    decode = sparse_decode and method != "oracle"
    walk = {"sketchwalk": base.walk, "one_hop": "one_hop", "walk": "damped", "oracle": "oracle"}[method]
    return base.replace(walk=walk, skip_decode=not decode, skip_prefill=False)


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def load_samples(data: Path, tasks: Sequence[str], lengths: Sequence[int], limit: int | None) -> list[dict[str, Any]]:
    out = []
    for length in lengths:
        for task in tasks:
            path = dataset_path(data, length, task)
            if not path.is_file():
                raise FileNotFoundError(
                    f"--data {str(data)!r}: no {task} data at length {length} ({path}); "
                    f"make it with: flexwalk niah generate --tasks {task} --lengths {length} --out {data}"
                )
            records = read_jsonl(path)[:limit]
            for r in records:
                out.append({**r, "task": r.get("task", task), "target_length": length})
    return out


def done_samples(path: Path) -> set[tuple[str, int, int]]:
    if not path.is_file():
        return set()
    seen = set()
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
            # a run killed mid-write leaves a partial last line: drop it, the sample runs again
            path.write_text("".join(x + "\n" for x in lines[:i]))
            break
        seen.add((r["task"], int(r["length"]), int(r["index"])))
    return seen


def summarise(run_dir: Path) -> dict[str, Any]:
    """Write summary.json and summary.csv of a run directory from its samples.jsonl."""
    run = json.loads((run_dir / "run.json").read_text())
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines() if x.strip()]
    cells: dict[tuple[str, int], list[dict]] = {}
    for s in samples:
        cells.setdefault((s["task"], s["length"]), []).append(s)
    rows = []
    for (task, length), group in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append({
            "task": task, "length": length, "n": len(group),
            "string_match_all": mean([g["score_all"] for g in group]),
            "string_match_part": mean([g["score_part"] for g in group]),
            "prefill_s": mean([g["prefill_s"] for g in group]), "decode_s": mean([g["decode_s"] for g in group]),
            "density": mean([g["density"] for g in group]),
        })
    per_layer: dict[str, dict[str, list[float]]] = {"prefill": {}, "decode": {}}
    for s in samples:
        for phase in per_layer:
            for layer, d in (s.get("density_per_layer") or {}).get(phase, {}).items():
                per_layer[phase].setdefault(str(layer), []).append(d)
    summary = {
        "run": run, "cells": rows,
        "overall": {"n": len(samples), "string_match_all": mean([s["score_all"] for s in samples]),
                    "string_match_part": mean([s["score_part"] for s in samples]),
                    "density": mean([s["density"] for s in samples])},
        "density_per_layer": {ph: {k: sum(v) / len(v) for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}
                              for ph, d in per_layer.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    with (run_dir / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task", "length", "n"])
        w.writeheader()
        w.writerows(rows)
    return summary


def batches(todo: list[dict], tokenize, batch_size: int, same_tokens: bool):
    """Yield batches [(sample, ids)] of up to batch_size samples of one (task, length) cell.

    Cells keep their order in `todo`; inside a cell samples keep theirs.  same_tokens: only
    prompts of the same token count share a batch (a sparse selection with left padding that
    is not a whole number of blocks is another selection than the prompt's alone, see
    docs/niah.md); a cell's leftovers of each count run as smaller batches at its end.
    Tokenizes one sample at a time, so at most a few batches of token ids are held.
    """
    cells: dict[tuple[int, str], list[dict]] = {}
    for s in todo:
        cells.setdefault((s["target_length"], s["task"]), []).append(s)
    for group in cells.values():
        pending: dict[int | None, list] = {}
        for s in group:
            ids = tokenize(s)
            key = len(ids) if same_tokens else None
            bucket = pending.setdefault(key, [])
            bucket.append((s, ids))
            if len(bucket) == batch_size:
                yield pending.pop(key)
        yield from pending.values()


def run_method(model, tokenizer, method: str, config: SketchWalkConfig | None, samples: list[dict], out: Path, *,
               model_name: str, data: Path, max_new_tokens: int, progress: bool = True, batch_size: int = 1) -> Path:
    """Evaluate one method on `samples`, appending to OUT/<method>/samples.jsonl (skips samples already there).

    batch_size: samples decoded together (left-padded, one prefill and one greedy loop per
    batch; batches never mix tasks or lengths, and sparse methods batch only prompts of one
    token count).  A record's prefill_s / decode_s are then its batch's times divided by the
    batch size, and its density and counters are the batch's (density_scope "batch").
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be an int >= 1")
    run_dir = out / method
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "model": model_name, "method": method, "method_spec": {"sparse_decode": bool(config and not config.skip_decode)},
        "config": None if config is None or method == "flex" else config.to_dict(),
        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""), "versions": _versions(),
        "data": str(data), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "batch_size": batch_size,
    }
    run_json = run_dir / "run.json"
    if run_json.is_file():
        old = json.loads(run_json.read_text())
        if (old.get("model"), old.get("config")) != (info["model"], info["config"]):
            raise ValueError(f"{run_dir} holds a run of another model or configuration ({old.get('model')}, "
                             f"{old.get('config')}); pass another --out or delete it")
    else:
        run_json.write_text(json.dumps(info, indent=1))
    sample_file = run_dir / "samples.jsonl"
    done = done_samples(sample_file)
    todo = [s for s in samples if (s["task"], s["target_length"], int(s["index"])) not in done]
    if config is None:
        model.set_attn_implementation("sdpa")
    else:
        configure(model, config)
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=method, disable=not progress,
               file=sys.stderr, dynamic_ncols=True)

    def tokenize(s: dict) -> list[int]:
        return tokenizer(s["input"] + s.get("answer_prefix", "")).input_ids

    # Full-budget flex keeps every block whatever the padding; the sparse methods' selection does not.
    todo_batches = batches(todo, tokenize, batch_size, same_tokens=config is not None and method != "flex")
    with sample_file.open("a") as f:
        for batch in todo_batches:
            stats.reset_counters()
            reset_decode_state(model)
            rows, prefill, total = greedy_batch(model, [ids for _, ids in batch], max_new_tokens, eos, pad)
            layers = {ph: {str(k): v for k, v in stats.density_report(ph).items()} for ph in ("prefill", "decode")}
            dens = layers["prefill"]
            counters = stats.counters()
            n = len(batch)
            for (s, ids), (new, finite) in zip(batch, rows):
                pred = tokenizer.decode(new, skip_special_tokens=True)
                score_all, score_part = score_prediction(pred, s["outputs"])
                rec = {
                    "index": int(s["index"]), "task": s["task"], "length": s["target_length"], "input_tokens": len(ids),
                    "depth": s.get("depth"), "pred": pred, "outputs": s["outputs"], "score_all": score_all,
                    "score_part": score_part, "prefill_s": prefill / n, "decode_s": (total - prefill) / n,
                    "new_tokens": len(new), "finite": finite,
                    "density": (sum(dens.values()) / len(dens)) if dens and method != "flex" else None,
                    "density_per_layer": layers if method != "flex" else None, "counters": counters,
                    "batch": n, "density_scope": "batch" if n > 1 else "sample",
                }
                f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(n)
            bar.set_postfix_str(f"{batch[0][0]['task']} {batch[0][0]['target_length']}")
    bar.close()
    model.set_attn_implementation("sdpa")
    summarise(run_dir)
    return run_dir
