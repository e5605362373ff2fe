"""The NIAH evaluation runner, the oracle selection and the fidelity measures."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk.cli import main as cli_main
from flexwalk.niah.fidelity import capture_attention_inputs, layer_fidelity, next_token_kl
from flexwalk.niah.run import METHODS, method_config
from flexwalk.selection import oracle_block_mass, sketchwalk_selection

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import build_model, random_ids  # noqa: E402


# --------------------------------------------------------------------------- oracle selection
@given(n=st.integers(1, 150), bs=st.sampled_from([16, 32]), g=st.sampled_from([1, 3]), pad=st.integers(0, 30),
       seed=st.integers(0, 5))
def test_oracle_block_mass_equals_dense_attention_mass(n, bs, g, pad, seed):
    """Chunked block mass == the dense causal softmax summed into blocks (head mean, rows normalised)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2 * g, n, 16, generator=gen)
    k = torch.randn(2, 2, n, 16, generator=gen)
    pad = min(pad, n - 1)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :pad] = False
    mass = oracle_block_mass(q, k, bs, key_valid=valid, chunk=bs)  # smallest chunk: most chunk seams
    kk = k.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) / 4.0
    t = torch.arange(n)
    allowed = (t[None, :] <= t[:, None])[None] & valid[:, None, :] & valid[:, :, None]
    p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0).mean(1)  # [B, n, n]
    nb = -(-n // bs)
    ref = torch.zeros(2, nb, nb)
    for i in range(n):
        for j in range(n):
            ref[:, i // bs, j // bs] += p[:, i, j]
    ref = ref / ref.sum(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(mass, ref, atol=1e-5, rtol=1e-5)


def test_oracle_keeps_the_most_mass_for_its_budget():
    """With the same forced blocks and budget, no other selection captures more dense attention
    mass than the oracle's, the walk's included."""
    q, k = torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16)
    base = SketchWalkConfig(block_size=16, density=0.3, dense_below=0)
    mass = oracle_block_mass(q, k, 16)
    got = {}
    for walk in ("oracle", "damped", "one_hop"):
        sel, _ = sketchwalk_selection(q, k, base.replace(walk=walk), 3)
        got[walk] = (mass * sel.mask.float()).sum(-1).mean().item()
    assert got["oracle"] >= got["damped"] - 1e-6 and got["oracle"] >= got["one_hop"] - 1e-6
    assert got["oracle"] > got["one_hop"] or got["oracle"] == pytest.approx(1.0)


def test_oracle_is_prefill_only():
    with pytest.raises(ValueError, match="walk='oracle'.*skip_decode=True"):
        SketchWalkConfig(walk="oracle", skip_decode=False)


# --------------------------------------------------------------------------- fidelity measures
def test_fidelity_at_full_budget_is_exact_and_sparse_is_not():
    model = build_model("llama", "sdpa")
    ids = random_ids(1, 120, seed=4)
    inputs, logits = capture_attention_inputs(model, ids)
    assert sorted(inputs) == list(range(model.config.num_hidden_layers))
    full = SketchWalkConfig(block_size=16, density=1.0, dense_below=0, dense_layers=1)
    rows = layer_fidelity(model, inputs, full)
    sparse_rows = [r for r in rows if r["sparse"]]
    assert sparse_rows and all(r["rel_error"] < 1e-5 and r["recall"] > 1 - 1e-5 for r in sparse_rows)
    assert next_token_kl(model, ids, full, last=16, dense_logits=logits) < 1e-6
    low = full.replace(density=0.2, dense_tail_blocks=0)
    rows = [r for r in layer_fidelity(model, inputs, low) if r["sparse"]]
    assert all(r["density"] < 0.6 and 0 < r["recall"] < 1 and r["rel_error"] > 1e-4 for r in rows)
    assert next_token_kl(model, ids, low, last=16, dense_logits=logits) > 1e-6


# --------------------------------------------------------------------------- runner, end to end
def test_method_configs():
    base = SketchWalkConfig(density=0.2)
    assert method_config("sdpa", base) is None
    assert method_config("flex", base).density == 1.0
    assert method_config("one_hop", base).walk == "one_hop"
    assert method_config("oracle", base, sparse_decode=True).skip_decode  # oracle never decodes sparsely
    assert not method_config("sketchwalk", base, sparse_decode=True).skip_decode
    with pytest.raises(ValueError, match="method='x'.*sdpa"):
        method_config("x", base)


@pytest.mark.slow
def test_generate_run_compare_on_smollm2(tmp_path, capsys):
    """The three commands on the packaged model: full-budget flex answers exactly like sdpa,
    runs resume, and the report reads the result directories."""
    data, out, rep = tmp_path / "data", tmp_path / "res", tmp_path / "report"
    assert cli_main(["niah", "generate", "--tasks", "niah_single_1", "--lengths", "640", "--samples", "2",
                     "--tokens-to-generate", "16", "--out", str(data)]) == 0
    run = ["niah", "run", "--data", str(data), "--out", str(out), "--lengths", "640", "--tasks", "niah_single_1",
           "--max-new-tokens", "6", "--config", '{"dense_below": 256, "block_size": 64}']
    assert cli_main(run) == 0
    samples = {m: [json.loads(x) for x in (out / m / "samples.jsonl").read_text().splitlines()] for m in METHODS}
    assert all(len(v) == 2 for v in samples.values())
    assert [s["pred"] for s in samples["flex"]] == [s["pred"] for s in samples["sdpa"]]
    for m in ("sketchwalk", "one_hop", "oracle"):
        assert all(0 < s["density"] < 1 for s in samples[m]), m
        assert all(s["counters"].get("sparse_prefill", 0) > 0 for s in samples[m]), m
    summary = json.loads((out / "sketchwalk" / "summary.json").read_text())
    assert summary["cells"][0]["n"] == 2 and summary["density_per_layer"]["prefill"]
    assert cli_main(run) == 0  # resumed: nothing to add
    assert len((out / "sdpa" / "samples.jsonl").read_text().splitlines()) == 2
    assert cli_main(["niah", "compare", *(str(out / m) for m in METHODS), "--out", str(rep)]) == 0
    assert "sketchwalk" in (rep / "report.md").read_text()


def test_run_errors_name_the_argument(tmp_path, capsys):
    assert cli_main(["niah", "run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--tasks",
                     "niah_single_1", "--lengths", "1k"]) == 2
    assert "no niah_single_1 data at length 1024" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["niah", "run", "--data", str(tmp_path), "--out", str(tmp_path), "--methods", "dense"])
    assert "--methods 'dense'" in capsys.readouterr().err


def test_resume_drops_a_partial_last_line_only(tmp_path):
    from flexwalk.niah.run import _done

    f = tmp_path / "samples.jsonl"
    good = json.dumps({"task": "niah_single_1", "length": 4096, "index": 3})
    f.write_text(good + "\n" + '{"task": "niah_sin')
    assert _done(f) == {("niah_single_1", 4096, 3)}
    assert f.read_text() == good + "\n"  # the partial record is gone; the sample runs again
    f.write_text('{"broken\n' + good + "\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        _done(f)
