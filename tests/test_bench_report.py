"""benchmarks/report.py on the CPU: its arguments, the JSON -> Markdown and figures rendering of a
given report, and one whole run at tiny sizes (the GPU measurement's code, on the small shape)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import report, workload
from flexwalk import SketchWalkConfig
from flexwalk.reference import sample_rows


def test_arguments_fill_in_the_device_defaults_quick_and_given_values():
    args = report.parse_args(["--out", "x"], device="cuda")
    assert args.lengths == [8192, 32768, 65536, 131072] and args.blocks == [128] and args.ttft_layers == 32
    assert args.kernels == workload.kernels_for("cuda") and args.sections == ["layer", "varlen", "padded", "ttft", "decode"]
    quick = report.parse_args(["--out", "x", "--quick"], device="cuda")
    assert quick.lengths == [32768, 131072] and quick.blocks == [128, 64] and quick.densities == [0.2]
    assert quick.kernels == ["auto", "triton", "flex"] and quick.decode_lengths == [32768]
    given = report.parse_args(["--out", "x", "--quick", "--lengths", "4096", "--densities", "0.1,0.3", "--batches",
                               "1,4", "--kernels", "fa4", "--sections", "layer"], device="cuda")
    assert (given.lengths, given.densities, given.batches, given.kernels, given.sections) == (
        [4096], [0.1, 0.3], [1, 4], ["fa4"], ["layer"])
    assert given.scorings == [SketchWalkConfig().prefill_scoring]  # the config's default
    assert report.parse_args(["--out", "x", "--scorings", "sketch,bound"], device="cuda").scorings == ["sketch", "bound"]
    cpu = report.parse_args(["--out", "x"], device="cpu")
    assert cpu.lengths == [1024, 2048] and cpu.kernels == ["auto", "flex"] and cpu.dense_below == 0


@pytest.mark.parametrize("argv", [["--kernels", "cudnn"], ["--sections", "layer,prefill"], ["--lengths", "8k"],
                                  ["--blocks", "96"], ["--densities", "0"], ["--batches", "0"], ["--scorings", "max"]])
def test_arguments_refuse_unknown_values(argv, capsys):
    with pytest.raises(SystemExit):
        report.parse_args(["--out", "x", *argv], device="cpu")
    assert "error" in capsys.readouterr().err


def _check(ok=True):
    return dict(kernel="triton", density=0.209, err=1e-3 if ok else 0.5, budget=4e-3, full_err=1e-3, full_budget=4e-3,
                rows=256, finite=True, ok=ok)


def _layer(n, kernel, speedup, ok=True):
    return dict(batch=1, n=n, block_size=128, density=0.2, kernel=kernel, dense="cuDNN SDPA", dense_ms=14.4,
                selection_ms=0.15, ran="triton", sparse_ms=14.4 / speedup, speedup=speedup, achieved_density=0.209,
                check=_check(ok))


def _given_report(failed_check=False):
    """A report as main() writes it, with made-up numbers."""
    counters = {"dense_layer": 2, "sparse_prefill": 30, "triton_prefill": 30}
    run = lambda t: dict(ttft_s=t, times_s=[t], peak_gib=19.1, counters=counters, finite=True)  # noqa: E731
    step = lambda ms: dict(ms_per_token=ms, tokens_per_s=1e3 / ms, steps=32, finite=True,  # noqa: E731
                           counters={"sparse_decode": 900, "decode_graph_steps": 870})
    return dict(
        env=dict(python="3.12.3", torch="2.11.0+cu130", transformers="5.17.0", triton="3.6.0", flash_attn_4=None,
                 flexwalk="0.1.0", device="NVIDIA H100 80GB HBM3", gpus=1, cuda="13.0", cudnn=91000),
        shape=workload.LLAMA_8B.to_dict(), args={"quick": True}, errors={},
        layer=[_layer(32768, "triton", 3.16), _layer(131072, "triton", 3.70, ok=not failed_check),
               _layer(32768, "flex", 2.5), dict(batch=1, n=131072, block_size=128, density=0.2, kernel="flex",
                                                 dense="cuDNN SDPA", dense_ms=252.8, selection_ms=0.5,
                                                 error="OutOfMemoryError: made up")],
        model="random-weight LlamaConfig model, 32 layers", model_config=workload.layer_config(128, 0.2).to_dict(),
        ttft=[dict(n=n, kernel="auto", ran="triton", layers=32, sparse_layers=30, sdpa=run(a), sketchwalk=run(b),
                   speedup=a / b, ok=True) for n, a, b in ((32768, 1.382, 1.082), (131072, 11.636, 6.172))],
        decode=[dict(n=32768, cache="static", sdpa=step(52.4), sketchwalk=step(35.7), speedup=52.4 / 35.7, ok=True)],
    )


def test_a_report_renders_to_json_markdown_and_three_figures(tmp_path):
    pytest.importorskip("matplotlib")
    rep = _given_report()
    report.write_outputs(rep, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["env"]["device"] == "NVIDIA H100 80GB HBM3" and saved["shape"]["dtype"] == "bfloat16"
    assert {"env", "shape", "args", "layer", "ttft", "decode", "figures"} <= set(saved)
    assert saved["layer"][0]["check"]["ok"] and saved["layer"][0]["dense_ms"] == 14.4
    assert saved["figures"] == {"layer": "layer_speedup.png", "ttft": "ttft.png", "decode": "decode.png"}
    for name in saved["figures"].values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "NVIDIA H100 80GB HBM3; torch 2.11.0+cu130" in md and "flash-attn-4 not installed" in md
    layer_rows = [line for line in md.splitlines() if line.startswith("| 1 | ")]
    assert len(layer_rows) == 4
    assert "| 1 | 32768 | 128, sketch | 0.2 (0.209) | triton (triton) | 14.4 | 0.150 | 4.56 | **3.16x** | ok |" in md
    assert "| 1 | 131072 | 128, sketch | 0.2 | flex | 253 | | | | error: OutOfMemoryError: made up |" in md
    assert "| 131072 | auto (triton, sketch) | 30 of 32 | 11.636 | 6.172 | **1.89x** | 19.1 / 19.1 | ok |" in md
    assert "| 32768 | 52.40 | 35.70 | 19.1 / 28.0 | **1.47x** | 900 (870) | ok |" in md
    assert "SketchWalkConfig(block_size=128, density=0.2, dense_layers=0, dense_below=0)" in md
    assert "![layer](layer_speedup.png)" in md
    # the failed row is listed; a clean report says every check passed
    assert report.failed(rep) == ["layer n=131072 batch 1 block 128, sketch density 0.2 flex: OutOfMemoryError: made up"]
    assert "## Failed" in md and "Every check passed" not in md


def test_a_failed_check_is_reported_and_figures_are_optional(tmp_path, monkeypatch):
    rep = _given_report(failed_check=True)
    rep["layer"] = rep["layer"][:3]
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if it were not installed
    report.write_outputs(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "FAILED (err 5.00e-01 / 4.00e-03, full 1.00e-03)" in md
    assert "Figures not drawn: matplotlib is not installed" in md and not list(tmp_path.glob("*.png"))
    assert len(report.failed(rep)) == 1 and "n=131072" in report.failed(rep)[0]


def test_a_tiny_run_on_the_cpu_measures_checks_and_writes_everything(tmp_path):
    """The report's own code end to end on the small CPU shape: every section, every check."""
    pytest.importorskip("matplotlib")
    # 512 tokens, 8 blocks of 64: enough that the forced blocks (sink, two local) and the dense tail leave some out
    status = report.main(["--out", str(tmp_path), "--lengths", "512", "--ttft-lengths", "256", "--decode-lengths",
                          "256", "--decode-steps", "5", "--ttft-reps", "1"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert status == 0, report.failed(saved)
    assert saved["env"]["device"] == "cpu" and saved["shape"]["name"] == workload.SMALL.name
    assert [(r["n"], r["kernel"], r["ran"]) for r in saved["layer"]] == [(512, "auto", "flex"), (512, "flex", "flex")]
    for row in saved["layer"]:
        assert row["check"]["ok"] and row["check"]["rows"] == len(sample_rows(512)) and row["sparse_ms"] > 0
        assert row["dense_ms"] > 0
        assert 0 < row["achieved_density"] < 1
    for row in saved["varlen"]:  # 300 / 1024 / 700 tokens packed; on the CPU every layer sparse (dense_below 0)
        assert row["check"]["ok"] and row["counters"]["sparse_prefill"] == 3 and row["sparse_ms"] > 0
        assert row["host_cu_sparse_ms"] > 0
    for row in saved["padded"]:  # 256 / 1024 / 640 tokens (whole blocks) left-padded to 1024: one sparse call
        assert row["check"]["ok"] and row["lengths"] == [256, 1024, 640] and row["width"] == 1024
        assert row["counters"]["sparse_prefill"] == 1
        assert row["check"]["err"] <= row["check"]["budget"] and row["sparse_ms"] > 0
    (ttft,) = saved["ttft"]
    assert ttft["ok"] and ttft["sparse_layers"] == 2 and ttft["layers"] == 4  # dense_layers "auto": the first two
    (dec,) = saved["decode"]
    assert dec["ok"] and dec["sketchwalk"]["counters"]["sparse_decode"] == 2 * 5  # 2 sparse layers x 5 steps
    assert set(saved["figures"]) == {"layer", "ttft", "decode"}


def test_the_layer_section_sets_scorings_side_by_side(tmp_path):
    """--scorings sketch,bound: one row per scoring for the same dense time, each checked against
    the oracle on its own selection; the bound's rows say so in the block column."""
    status = report.main(["--out", str(tmp_path), "--sections", "layer", "--lengths", "512", "--kernels", "flex",
                          "--scorings", "sketch,bound"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert status == 0, report.failed(saved)
    rows = saved["layer"]
    assert [r["scoring"] for r in rows] == ["sketch", "bound"] and rows[0]["dense_ms"] == rows[1]["dense_ms"]
    assert all(r["check"]["ok"] and 0 < r["achieved_density"] < 1 for r in rows)
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | 512 | 64, sketch |" in md and "| 1 | 512 | 64, bound |" in md


def test_the_batch_sections_set_scorings_side_by_side(tmp_path):
    """--scorings sketch,bound in the varlen and padded sections: one row per scoring for the same
    dense times, each checked against its sequences' solo runs with that scoring; with
    --dense-below 512 the 256-token sequence runs dense (counted once packed, as a padded row)."""
    status = report.main(["--out", str(tmp_path), "--sections", "varlen,padded", "--varlen-lengths", "256,1024,640",
                          "--kernels", "flex", "--scorings", "sketch,bound", "--dense-below", "512"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert status == 0, report.failed(saved)
    for name in ("varlen", "padded"):
        rows = saved[name]
        assert [r["scoring"] for r in rows] == ["sketch", "bound"] and rows[0]["dense_ms"] == rows[1]["dense_ms"]
        assert all(r["check"]["ok"] for r in rows)
    assert all(r["counters"]["dense_short"] == 1 and r["counters"]["sparse_prefill"] == 2 for r in saved["varlen"])
    assert all(r["counters"]["dense_short_rows"] == 1 for r in saved["padded"])
    md = (tmp_path / "report.md").read_text()
    assert "| flex (flex, sketch) |" in md and "| flex (flex, bound) |" in md


@pytest.mark.parametrize("wrong", ["sparse", "full"])
def test_the_check_before_timing_fails_a_wrong_layer(wrong, monkeypatch):
    """workload.check_layer passes the layer as it is and fails it when one query row of the
    sparse output, or of the full-budget one, is off by 1e-3 (batch 2: each row is checked)."""
    q, k, v = workload.qkv(workload.SMALL, 700, batch=2)
    config = workload.layer_config(64, 0.2)
    assert workload.check_layer(q, k, v, config)["ok"]
    layer = workload.sketchwalk_attention

    def off_by_a_little(q, k, v, cfg, layer_idx):
        out, state = layer(q, k, v, cfg, layer_idx)
        if (cfg.density == 1.0) == (wrong == "full"):
            out = out.clone()
            out[1, :, 699] += 1e-3  # the last row of the second batch row, a row the check samples
        return out, state

    monkeypatch.setattr(workload, "sketchwalk_attention", off_by_a_little)
    check = workload.check_layer(q, k, v, config)
    assert not check["ok"]
    err, budget = (check["err"], check["budget"]) if wrong == "sparse" else (check["full_err"], check["full_budget"])
    assert err > budget and err == pytest.approx(1e-3, rel=0.05)


def test_the_model_sections_load_a_model_directory(tmp_path):
    """--model: the ttft and decode sections time the model a user names (here a tiny saved one)."""
    from transformers import LlamaForCausalLM

    conf = workload.model_config("cpu", 3)
    torch.manual_seed(0)
    LlamaForCausalLM(conf).save_pretrained(tmp_path / "tiny")
    status = report.main(["--out", str(tmp_path / "out"), "--sections", "ttft", "--model", str(tmp_path / "tiny"),
                          "--ttft-lengths", "256", "--ttft-reps", "1"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert status == 0, report.failed(saved)
    assert saved["model"].startswith(f"{tmp_path / 'tiny'} (llama), 3 layers")
    (ttft,) = saved["ttft"]
    assert ttft["ok"] and ttft["layers"] == 3 and ttft["sparse_layers"] == 1  # dense_layers "auto": the first two


def test_the_ttft_section_sets_scorings_side_by_side(tmp_path):
    """--scorings reaches the time to first token too: one row per scoring against the same sdpa
    forward, each with sparse layers that ran, the bound's row named so in the table."""
    status = report.main(["--out", str(tmp_path), "--sections", "ttft", "--ttft-lengths", "256", "--ttft-reps", "1",
                          "--scorings", "sketch,bound"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert status == 0, report.failed(saved)
    rows = saved["ttft"]
    assert [r["scoring"] for r in rows] == ["sketch", "bound"] and rows[0]["sdpa"] == rows[1]["sdpa"]
    assert all(r["ok"] and r["sparse_layers"] == 2 for r in rows)
    assert "(flex, bound)" in (tmp_path / "report.md").read_text()
