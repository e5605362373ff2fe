"""RULER metrics (hand-checked cases and properties) and the NIAH comparison report."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexwalk.niah.metrics import (
    PART,
    metric_name,
    postprocess_pred,
    score_prediction,
    score_task,
    string_match_all,
    string_match_all_per_sample,
    string_match_part,
    string_match_part_per_sample,
)
from flexwalk.niah.cli import add_compare_arguments, compare_main
from flexwalk.niah.report.compare import compare
from flexwalk.niah.report.load import load_run, read_samples

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "tiny-llama"
TASKS = ("niah_single_1", "niah_multikey_1", "qa_1")
LENGTHS = (4096, 8192)

# ----------------------------------------------------------------------------- metrics, hand-checked


def test_string_match_all_and_part_hand_checked():
    assert string_match_all(["The special magic number is 1234."], [["1234"]]) == 100.0
    # case-insensitive both ways
    assert string_match_all(["ANSWER: AbCd-Ef"], [["abcd-ef"]]) == 100.0
    assert string_match_part(["answer: abcd"], [["ABCD"]]) == 100.0
    # several references: all = fraction found, part = any found
    assert string_match_all(["values 12 and 56"], [["12", "34", "56", "78"]]) == 50.0
    assert string_match_part(["values 12 and 56"], [["12", "34", "56", "78"]]) == 100.0
    # mean over samples, x100, rounded to 2 decimals
    assert string_match_all(["12", "", "nothing"], [["12", "34"], ["7"], ["7"]]) == 16.67  # (0.5+0+0)/3
    assert string_match_part(["12", "", "nothing"], [["12", "34"], ["7"], ["7"]]) == 33.33
    assert string_match_all(["a b", "c"], [["a", "b", "x"], ["c"]]) == 83.33  # (2/3 + 1)/2
    # empty prediction finds nothing (an empty reference is a substring of anything, as in RULER)
    assert string_match_all([""], [["1234"]]) == 0.0 and string_match_part([""], [["1234"]]) == 0.0
    assert string_match_all([""], [[""]]) == 100.0
    # substring, not token match
    assert string_match_all(["123456"], [["2345"]]) == 100.0


def test_per_sample_scores_are_0_to_100_unrounded():
    preds, refs = ["a b", "c", ""], [["a", "b", "x"], ["c"], ["q", "r"]]
    assert string_match_all_per_sample(preds, refs) == pytest.approx([200 / 3, 100.0, 0.0])
    assert string_match_part_per_sample(preds, refs) == [100.0, 100.0, 0.0]


def test_postprocess_pred_matches_ruler():
    assert postprocess_pred("  42 \n") == "42"
    assert postprocess_pred("a\x00b\tc\x1fd") == "a\nb\nc\nd"
    assert postprocess_pred("\t\x01 x \x02\n") == "x"
    assert postprocess_pred("keep\x7f") == "keep\x7f"  # DEL is outside RULER's \x00-\x1f
    assert score_prediction(" 12\x0034 ", ["12", "34"]) == (100.0, 100.0)
    assert score_prediction("\n\n", ["1"]) == (0.0, 0.0)
    assert score_task("niah_single_1", ["\x00 7 \x00", "8"], [["7"], ["9"]]) == 50.0


def test_task_to_metric():
    for task in ("niah_single_1", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
                 "niah", "variable_tracking", "niah_custom"):
        assert metric_name(task) == "string_match_all", task
    assert metric_name("qa_1") == metric_name("qa_2") == metric_name("qa") == PART
    with pytest.raises(ValueError, match=r"task='summarise'.*must be one of"):
        metric_name("summarise")


@pytest.mark.parametrize("preds,refs,match", [
    ([], [], r"preds=\[\] must be a non-empty list"),
    (["a"], [["a"], ["b"]], "preds has 1 entries but refs has 2"),
    (["a"], [[]], r"references=\[\] must be a non-empty list"),
    (["a"], ["a"], r"references='a' must be a non-empty list"),
])
def test_metric_errors(preds, refs, match):
    for fn in (string_match_all, string_match_part, string_match_all_per_sample):
        with pytest.raises(ValueError, match=match):
            fn(preds, refs)


# ----------------------------------------------------------------------------- metrics, properties

texts = st.text(max_size=30)
refs_lists = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5)


@given(st.lists(st.tuples(texts, refs_lists), min_size=1, max_size=6))
def test_scores_bounded_and_all_le_part(data):
    preds, refs = [p for p, _ in data], [r for _, r in data]
    a, p = string_match_all(preds, refs), string_match_part(preds, refs)
    assert 0.0 <= a <= p <= 100.0
    per_a, per_p = string_match_all_per_sample(preds, refs), string_match_part_per_sample(preds, refs)
    assert all(0.0 <= x <= y <= 100.0 for x, y in zip(per_a, per_p))
    assert set(per_p) <= {0.0, 100.0}
    assert abs(statistics.fmean(per_a) - a) <= 0.005 + 1e-9  # per-sample means equal RULER's, up to rounding
    assert abs(statistics.fmean(per_p) - p) <= 0.005 + 1e-9


@given(refs_lists, st.text(max_size=10), st.text(max_size=10))
def test_prediction_containing_every_reference_scores_100(refs, before, sep):
    pred = before + sep.join(refs) + sep
    assert string_match_all([pred], [refs]) == 100.0 == string_match_part([pred], [refs])
    if pred.isascii():
        assert string_match_all_per_sample([pred.upper()], [refs])[0] == 100.0


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=30),
       st.lists(st.text(alphabet=st.characters(max_codepoint=127), min_size=1, max_size=6), min_size=1, max_size=4))
def test_case_insensitive(pred, refs):
    assert string_match_all([pred.upper()], [[r.lower() for r in refs]]) == string_match_all([pred.lower()], [refs])
    assert string_match_part([pred.swapcase()], [refs]) == string_match_part([pred], [refs])


# ----------------------------------------------------------------------------- synthetic results


def _write_run(d: Path, method: str, config, cells: dict, per_layer=None) -> Path:
    """cells: (task, length) -> list of (score_all, score_part, density)."""
    d.mkdir(parents=True)
    run = {"model": MODEL, "method": method, "method_spec": {}, "config": config, "device": "cpu",
           "dtype": "float32", "versions": {"torch": "x", "transformers": "y"}, "data": "synthetic",
           "created": "2025-01-01T00:00:00"}
    (d / "run.json").write_text(json.dumps(run))
    with (d / "samples.jsonl").open("w") as f:
        for (task, length), rows in cells.items():
            for i, (sa, sp, dens) in enumerate(rows):
                f.write(json.dumps({
                    "index": i, "task": task, "length": length, "input_tokens": length - 10, "depth": 0.5,
                    "pred": "x", "outputs": ["x"], "score_all": sa, "score_part": sp, "prefill_s": 0.5 + i * 0.01,
                    "decode_s": 0.1, "new_tokens": 5, "density": dens}) + "\n")
    (d / "summary.json").write_text(json.dumps({"run": run, "cells": [], "overall": {},
                                                "density_per_layer": per_layer or {"prefill": {}, "decode": {}}}))
    return d


def _random_cell(rng: random.Random, n: int, dense: bool, zero: bool = False) -> list:
    rows = []
    for _ in range(n):
        sa = 0.0 if zero else rng.choice([0.0, 50.0, 100.0, 100.0])
        rows.append((sa, 100.0 if sa > 0 else 0.0, None if dense else 0.2 + rng.random() * 0.05))
    return rows


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ruler_line(i: int, pred: str, outputs: list[str]) -> dict:
    return {"index": i, "pred": pred, "input": "haystack ...", "outputs": outputs, "others": {},
            "truncation": -1, "length": 4000}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("niah")
    rng = random.Random(0)
    sdpa = {(t, L): _random_cell(rng, 60, dense=True) for L in LENGTHS for t in TASKS}
    sparse = {(t, L): _random_cell(rng, 60 if L == 4096 else 12, dense=False,
                                   zero=(t == "niah_multikey_1" and L == 8192)) for L in LENGTHS for t in TASKS}
    per_layer = {"prefill": {"0": 1.0, "1": 0.25, "2": 0.2}, "decode": {"0": 1.0, "1": 0.3, "2": 0.3}}
    _write_run(root / "sdpa_run", "sdpa", None, sdpa)
    _write_run(root / "sw_run", "sketchwalk", {"density": 0.2}, sparse, per_layer)
    # RULER layout: <root>/<model>/synthetic/<length>/pred/<task>.jsonl, one task in two chunks
    pred = root / "ruler" / "llama-ruler-name" / "synthetic" / "4096" / "pred"
    pred.mkdir(parents=True)
    _jsonl(pred / "niah_single_1.jsonl", [
        _ruler_line(0, " The number is 1234.\n", ["1234"]),
        _ruler_line(1, "ABC-def", ["abc-DEF"]),
        _ruler_line(2, "", ["99"]),
        _ruler_line(3, "7\x008", ["78"]),  # the control character becomes a newline: no match
    ])  # 50.0
    _jsonl(pred / "niah_multikey_1-0.jsonl", [_ruler_line(0, "11 22", ["11", "22"]),
                                               _ruler_line(1, "11", ["11", "22"])])
    _jsonl(pred / "niah_multikey_1-1.jsonl", [_ruler_line(2, "none", ["11", "22"])])  # (1 + .5 + 0)/3 = 50.0
    _jsonl(pred / "qa_1.jsonl", [_ruler_line(0, "Paris", ["paris", "Paris, France"]),  # all 50, part 100
                                 _ruler_line(1, "no", ["x"])])  # part: 50
    _jsonl(pred / "summarise.jsonl", [_ruler_line(0, "x", ["x"])])  # not a RULER task: skipped
    (pred / "summary.csv").write_text("0,1,2\nTasks,niah_single_1,niah_multikey_1\nScore,50.0,61.0\nNulls,1/4,0/3\n")
    other = root / "ruler2" / "other-model" / "synthetic" / "4096" / "pred"
    other.mkdir(parents=True)
    _jsonl(other / "niah_single_1.jsonl", [_ruler_line(0, "5", ["5"])])
    out = root / "report"
    report = compare([root / "sdpa_run", root / "sw_run", root / "ruler", root / "ruler2"], out,
                     labels=[None, "", "ruler_ext@" + MODEL, None])
    return {"root": root, "out": out, "report": report, "md": (out / "report.md").read_text(),
            "sdpa": sdpa, "sketchwalk": sparse}


def _section(md: str, model: str) -> str:
    return md.split(f"## Model `{model}`")[1].split("\n## ")[0]


def _table(text: str, heading: str) -> list[dict[str, str]]:
    lines = text.split(heading, 1)[1].split("\n", 1)[1].strip().splitlines()  # from the line after the heading
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [dict(zip(rows[0], r)) for r in rows[2:]]


def _num(cell: str) -> float:
    return float(cell.split()[0])


def _expected_cells(data: dict) -> dict:
    """(task, length) -> (mean accuracy with RULER's metric per task, n), computed from the raw rows."""
    out = {}
    for (task, length), rows in data.items():
        scores = [sp if task.startswith("qa") else sa for sa, sp, _ in rows]
        out[(task, length)] = (sum(scores) / len(scores), len(scores))
    return out


def test_method_by_length_table_matches_independent_means(results):
    rows = {r["method"]: r for r in _table(_section(results["md"], MODEL), "### Accuracy by method and length")}
    assert list(rows) == ["sdpa", "sketchwalk", "ruler_ext"]
    for method in ("sdpa", "sketchwalk"):
        cells = _expected_cells(results[method])
        per_length = {L: sum(cells[(t, L)][0] for t in TASKS) / len(TASKS) for L in LENGTHS}
        for L in LENGTHS:
            assert _num(rows[method][str(L)]) == pytest.approx(per_length[L], abs=0.0051)
        assert _num(rows[method]["avg"]) == pytest.approx(sum(per_length.values()) / 2, abs=0.0051)
    assert "†" not in rows["sdpa"]["4096"] and "†" in rows["sketchwalk"]["8192"]  # 12 < 50 samples
    assert "†" not in rows["sketchwalk"]["4096"]
    # RULER predictions scored with RULER's rule: niah 50, multikey 50 (chunks joined), qa part 50
    assert _num(rows["ruler_ext"]["4096"]) == pytest.approx(50.0, abs=0.0051)
    assert rows["ruler_ext"]["8192"] == ""


def test_task_by_method_table(results):
    rows = {r["task"]: r for r in _table(_section(results["md"], MODEL), "### Accuracy by task and method")}
    assert list(rows) == list(TASKS)
    for method in ("sdpa", "sketchwalk"):
        cells = _expected_cells(results[method])
        for t in TASKS:
            assert _num(rows[t][method]) == pytest.approx(sum(cells[(t, L)][0] for L in LENGTHS) / 2, abs=0.0051)
    assert _num(rows["qa_1"]["ruler_ext"]) == 50.0 and _num(rows["niah_multikey_1"]["ruler_ext"]) == 50.0


def test_worst_task_per_method_and_length(results):
    rows = {r["method"]: r for r in _table(_section(results["md"], MODEL), "### Worst task per method and length")}
    assert rows["sketchwalk"]["8192"] == "niah_multikey_1 (0.00, n=12)"
    for method in ("sdpa", "sketchwalk"):
        cells = _expected_cells(results[method])
        for L in LENGTHS:
            worst = min(TASKS, key=lambda t: (cells[(t, L)][0], TASKS.index(t)))
            assert rows[method][str(L)].startswith(f"{worst} ({cells[(worst, L)][0]:.2f}, n={cells[(worst, L)][1]})")


def test_baseline_deltas(results):
    sec = _section(results["md"], MODEL)
    base, sw = _expected_cells(results["sdpa"]), _expected_cells(results["sketchwalk"])
    per_cell = _table(sec, "### Delta to baseline `sdpa` per cell")
    got = {(r["method"], r["task"], int(r["length"])): r for r in per_cell}
    assert len(got) == len(TASKS) * len(LENGTHS) + len(TASKS)  # sketchwalk everywhere, ruler_ext at 4096
    for t in TASKS:
        for L in LENGTHS:
            r = got[("sketchwalk", t, L)]
            assert _num(r["delta"]) == pytest.approx(sw[(t, L)][0] - base[(t, L)][0], abs=0.0051)
            assert (int(r["n"]), int(r["n baseline"])) == (sw[(t, L)][1], base[(t, L)][1])
            assert ("†" in r["delta"]) == (L == 8192)
    assert _num(got[("ruler_ext", "qa_1", 4096)]["delta"]) == pytest.approx(50.0 - base[("qa_1", 4096)][0], abs=0.0051)
    summary = {r["method"]: r for r in _table(sec, "### Delta to baseline `sdpa` (mean")}
    for L in LENGTHS:
        expected = sum(sw[(t, L)][0] - base[(t, L)][0] for t in TASKS) / len(TASKS)
        assert _num(summary["sketchwalk"][str(L)]) == pytest.approx(expected, abs=0.0051)
    assert "sdpa" not in summary and summary["ruler_ext"]["8192"] == "n/a"
    loss = {r["method"]: r for r in _table(sec, "### Largest loss to baseline `sdpa`")}
    for L in LENGTHS:
        worst = min(TASKS, key=lambda t: (sw[(t, L)][0] - base[(t, L)][0], TASKS.index(t)))
        assert loss["sketchwalk"][str(L)] == f"{worst} ({sw[(worst, L)][0] - base[(worst, L)][0]:+.2f})"
    assert "†" not in summary["sketchwalk"]["4096"] and "†" in summary["sketchwalk"]["8192"]


def test_paired_differences_match_an_independent_computation(results):
    """Pairs are (task, length, index) matches; the SE is stdev(d) / sqrt(pairs), pooled over lengths too."""
    base, sw = results["sdpa"], results["sketchwalk"]

    def score(task, row):
        return row[1] if task.startswith("qa") else row[0]

    diffs = {L: [score(t, a) - score(t, b) for t in TASKS for a, b in zip(sw[(t, L)], base[(t, L)])]
             for L in LENGTHS}  # zip: the sparse cells at 8192 have 12 samples, the dense ones 60
    rep = json.loads((results["out"] / "report.json").read_text())["models"][MODEL]["paired"]
    rows = {(r["method"], r["length"]): r for r in _table(_section(results["md"], MODEL), "### Paired difference")}
    for key, d in [*((str(L), diffs[L]) for L in LENGTHS), ("all", diffs[4096] + diffs[8192])]:
        got = rep["sketchwalk"][key]
        assert got["pairs"] == len(d) and got["delta"] == pytest.approx(statistics.fmean(d))
        assert got["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)))
        assert (got["better"], got["worse"]) == (sum(x > 0 for x in d), sum(x < 0 for x in d))
        assert got["better"] + got["worse"] < len(d)  # ties exist: neither count is a complement
        r = rows[("sketchwalk", key)]
        assert int(r["pairs"]) == len(d) and _num(r["delta"]) == pytest.approx(statistics.fmean(d), abs=0.0051)
        assert _num(r["SE"]) == pytest.approx(got["se"], abs=0.0051)
    # the RULER run scored 4 + 3 + 2 samples at 4096 that the baseline also has (indices 0-3, 0-2, 0-1)
    assert rep["ruler_ext"]["4096"]["pairs"] == 9 and "8192" not in rep["ruler_ext"]
    assert "sdpa" not in rep


def test_timing_density_and_json(results):
    rows = _table(_section(results["md"], MODEL), "### Time and density per method")
    got = {(r["method"], r["length"]): r for r in rows}
    dens = [d for _, _, d in results["sketchwalk"][("qa_1", 4096)] + results["sketchwalk"][("niah_single_1", 4096)]
            + results["sketchwalk"][("niah_multikey_1", 4096)]]
    assert _num(got[("sketchwalk", "4096")]["density"]) == pytest.approx(sum(dens) / len(dens), abs=0.0006)
    assert got[("sdpa", "4096")]["density"] == "n/a" and got[("ruler_ext", "4096")]["prefill s"] == "n/a"
    median = statistics.median(0.5 + i * 0.01 for i in range(60))
    assert _num(got[("sdpa", "4096")]["prefill s"]) == pytest.approx(median, abs=6e-4)
    rep = json.loads((results["out"] / "report.json").read_text())
    assert rep["baseline"] == "sdpa" and rep["min_samples"] == 50
    assert set(rep["models"]) == {MODEL, "other-model"}
    cell = next(c for c in rep["models"][MODEL]["cells"]
                if (c["method"], c["task"], c["length"]) == ("sdpa", "qa_1", 4096))
    assert cell["accuracy"] == pytest.approx(_expected_cells(results["sdpa"])[("qa_1", 4096)][0])
    assert cell["accuracy"] == cell["string_match_part"] >= cell["string_match_all"]


def test_under_powered_notes_and_other_model(results):
    md = results["md"]
    under = _table(md, "## Under-powered cells")
    assert {(r["method"], r["task"], r["length"]) for r in under if r["model"] == MODEL} == (
        {("sketchwalk", t, "8192") for t in TASKS} | {("ruler_ext", t, "4096") for t in TASKS})
    assert "summarise.jsonl skipped" in md
    assert "summary.csv says 61.00, these predictions score 50.00" in md
    assert "niah_single_1: RULER's summary.csv" not in md  # that one agrees
    other = _section(md, "other-model")
    assert "Baseline `sdpa` has no samples for this model" in other
    assert _num(_table(other, "### Accuracy by method and length")[0]["4096"]) == 100.0


def test_plots_are_png(results):
    names = results["report"]["plots"]
    assert {"accuracy_vs_density.png", "density_per_layer.png", f"accuracy_by_task_{MODEL}.png",
            f"accuracy_vs_length_{MODEL}.png", "accuracy_by_task_other-model.png"} <= set(names)
    for name in names:
        data = (results["out"] / name).read_bytes()
        assert len(data) > 2000 and data[:8] == PNG_MAGIC, name
        assert f"]({name})" in results["md"]


def test_load_run_normalises(results):
    run = load_run(results["root"] / "ruler" / "llama-ruler-name" / "synthetic" / "4096" / "pred")
    assert run.kind == "ruler" and run.groups == [("llama-ruler-name", "llama-ruler-name")]
    assert sorted({s.task for s in run.samples}) == ["niah_multikey_1", "niah_single_1", "qa_1"]
    assert sorted(s.index for s in run.samples if s.task == "niah_multikey_1") == [0, 1, 2]
    qa = [s for s in run.samples if s.task == "qa_1"]
    assert [(s.score_all, s.score_part, s.score) for s in qa] == [(50.0, 100.0, 100.0), (0.0, 0.0, 0.0)]
    ours = load_run(results["root"] / "sw_run")
    assert ours.kind == "flexwalk" and ours.dense is False and ours.density_per_layer["prefill"][1] == 0.25
    assert load_run(results["root"] / "sdpa_run").dense is True


def test_a_gzip_compressed_run_loads_as_the_plain_one(results, tmp_path):
    plain = results["root"] / "sw_run"
    packed = tmp_path / "sw_run_gz"
    packed.mkdir()
    for name in ("run.json", "summary.json"):
        (packed / name).write_bytes((plain / name).read_bytes())
    (packed / "samples.jsonl.gz").write_bytes(gzip.compress((plain / "samples.jsonl").read_bytes()))
    assert read_samples(packed) == read_samples(plain)
    a, b = load_run(plain), load_run(packed)
    assert [(s.task, s.length, s.index, s.score, s.density) for s in b.samples] == \
        [(s.task, s.length, s.index, s.score, s.density) for s in a.samples]
    assert b.dense is False and b.density_per_layer == a.density_per_layer
    (packed / "samples.jsonl.gz").write_bytes(gzip.compress(b'{"index": 0}\n'))
    with pytest.raises(ValueError, match=r"samples\.jsonl\.gz: sample .* lacks or mistypes a field"):
        load_run(packed)
    with pytest.raises(FileNotFoundError, match=r"holds none of samples\.jsonl, samples\.jsonl\.gz"):
        read_samples(tmp_path)


def test_unknown_task_of_a_flexwalk_run_is_scored_with_string_match_all(tmp_path):
    run = load_run(_write_run(tmp_path / "r", "sdpa", None, {("needle_x", 1024): [(50.0, 100.0, None)]}))
    assert run.samples[0].score == 50.0
    assert any("'needle_x' is not a RULER task name" in n for n in run.notes)


def test_bad_paths_name_the_path(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        load_run(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty_dir.*neither a flexwalk NIAH run directory.*nor a RULER"):
        load_run(empty)
    bad_len = tmp_path / "m" / "synthetic" / "long" / "pred"
    bad_len.mkdir(parents=True)
    _jsonl(bad_len / "niah_single_1.jsonl", [_ruler_line(0, "1", ["1"])])
    with pytest.raises(ValueError, match=r"long.*integer <length>"):
        load_run(tmp_path / "m")


def test_compare_argument_errors(results, tmp_path):
    root = results["root"]
    with pytest.raises(ValueError, match=r"baseline='dense'.*must be one of \['sdpa', 'sketchwalk'\]"):
        compare([root / "sdpa_run", root / "sw_run"], tmp_path / "o", baseline="dense")
    with pytest.raises(ValueError, match=r"labels=\['a'\] has 1 entries for 2 paths"):
        compare([root / "sdpa_run", root / "sw_run"], tmp_path / "o", labels=["a"])
    with pytest.raises(ValueError, match=r"min_samples=0 must be an int >= 1"):
        compare([root / "sdpa_run"], tmp_path / "o", min_samples=0)
    with pytest.raises(ValueError, match=r"'sdpa'.*niah_single_1 at length 4096 in both.*give distinct labels"):
        compare([root / "sdpa_run", root / "sdpa_run"], tmp_path / "o")


def test_one_method_split_over_runs_per_length_merges(tmp_path):
    """A method run once per length (one directory each) is one method of the report, with the
    cells of both runs; the same cell from two runs is still refused."""
    rng = random.Random(1)
    runs = {}
    for L in LENGTHS:
        runs[("sdpa", L)] = _write_run(tmp_path / f"sdpa_{L}", "sdpa", None,
                                       {(t, L): _random_cell(rng, 5, dense=True) for t in TASKS})
        runs[("sw", L)] = _write_run(tmp_path / f"sw_{L}", "sketchwalk", {"density": 0.2},
                                     {(t, L): _random_cell(rng, 5, dense=False) for t in TASKS},
                                     {"prefill": {"0": 1.0, "1": 0.2}, "decode": {}})
    rep = compare(list(runs.values()), tmp_path / "o", min_samples=5)
    mr = rep["models"][MODEL]
    assert mr["methods"] == ["sdpa", "sketchwalk"]
    cells = {(c["method"], c["task"], c["length"]) for c in mr["cells"]}
    assert cells == {(m, t, L) for m in ("sdpa", "sketchwalk") for t in TASKS for L in LENGTHS}
    with pytest.raises(ValueError, match=r"'sketchwalk'.*in both"):
        compare([runs[("sw", LENGTHS[0])], runs[("sw", LENGTHS[0])]], tmp_path / "o2")


def test_default_baseline_is_first_dense_run(results, tmp_path):
    root = results["root"]
    rep = compare([root / "sw_run", root / "sdpa_run"], tmp_path / "o", labels=["", "flex"], min_samples=5)
    assert rep["baseline"] == "flex"
    assert not any(c["under_powered"] for c in rep["models"][MODEL]["cells"])


def test_cli(results, tmp_path, capsys):
    root = results["root"]
    parser = add_compare_arguments(argparse.ArgumentParser(prog="flexwalk niah compare"))
    out = tmp_path / "cli"
    args = parser.parse_args([str(root / "sdpa_run"), str(root / "sw_run"), "--out", str(out),
                              "--labels", "dense,sparse", "--baseline", "dense", "--min-samples", "10"])
    assert compare_main(args) == 0
    assert "Delta to baseline `dense`" in (out / "report.md").read_text()
    assert "wrote" in capsys.readouterr().out
    args = parser.parse_args([str(tmp_path / "missing_run"), "--out", str(out)])
    assert compare_main(args) == 2
    assert "missing_run" in capsys.readouterr().err
    args = parser.parse_args([str(root / "sdpa_run"), "--labels", "a,b"])
    assert compare_main(args) == 2
    assert "--labels='a,b' has 2 entries for 1 result paths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([str(root / "sdpa_run"), "--min-samples", "0"])
    assert "--min-samples: must be an int >= 1, got '0'" in capsys.readouterr().err
