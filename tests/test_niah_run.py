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
from flexwalk.generation import greedy, greedy_batch
from flexwalk.cli import main as cli_main
from flexwalk.niah.fidelity import capture_attention_inputs, layer_fidelity, next_token_kl
from flexwalk.niah.run import METHODS, batches, method_config
from flexwalk.selection.driver import sketchwalk_selection
from flexwalk.selection.walk import oracle_block_mass

sys.path.insert(0, os.path.dirname(__file__))
from conftest import floor_tol  # noqa: E402
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
    inputs, logits = capture_attention_inputs(model, ids, logits_to_keep=16)
    assert sorted(inputs) == list(range(model.config.num_hidden_layers))
    assert logits.shape[1] == 16
    torch.testing.assert_close(logits, capture_attention_inputs(model, ids, logits_to_keep=0)[1][:, -16:])
    full = SketchWalkConfig(block_size=16, density=1.0, dense_below=0, dense_layers=1)
    rows = layer_fidelity(model, inputs, full)
    sparse_rows = [r for r in rows if r["sparse"]]
    assert sparse_rows and all(r["rel_error"] < 1e-5 and r["recall"] > 1 - 1e-5 for r in sparse_rows)
    assert next_token_kl(model, ids, full, last=16, dense_logits=logits) < 1e-6
    low = full.replace(density=0.2, dense_tail_blocks=0)
    rows = [r for r in layer_fidelity(model, inputs, low) if r["sparse"]]
    assert all(r["density"] < 0.6 and 0 < r["recall"] < 1 and r["rel_error"] > 1e-4 for r in rows)
    assert next_token_kl(model, ids, low, last=16, dense_logits=logits) > 1e-6


def test_fidelity_decides_auto_residual_for_the_model():
    """layer_fidelity replays residual="auto" as the model's attention calls run it: on in a model
    that mixes sliding-window and full layers (tiny Gemma 3), so its rows equal residual=True's."""
    model = build_model("gemma3", "sdpa")
    inputs, _ = capture_attention_inputs(model, random_ids(1, 120, seed=4))
    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_below=0, dense_layers=0, dense_tail_blocks=0)
    auto, on, off = (layer_fidelity(model, inputs, cfg.replace(residual=r)) for r in ("auto", True, False))
    assert auto == on and auto != off


def test_fidelity_with_pooled_query_blocks_and_its_ablation():
    """query_block_size: recall is measured per 16-token query block (each kernel block's row
    repeated), exact at full budget, below 1 when sparse; the block_size ablation group has the
    64 x 128 entry and it builds a valid configuration."""
    from flexwalk.niah.fidelity import grid

    model = build_model("llama", "sdpa")
    inputs, _ = capture_attention_inputs(model, random_ids(1, 120, seed=4))
    cfg = SketchWalkConfig(block_size=16, query_block_size=32, density=0.2, dense_below=0, dense_layers=1,
                           dense_tail_blocks=0)
    rows = [r for r in layer_fidelity(model, inputs, cfg) if r["sparse"]]
    assert rows and all(0 < r["recall"] < 1 and r["density"] < 0.9 for r in rows)
    full = [r for r in layer_fidelity(model, inputs, cfg.replace(density=1.0)) if r["sparse"]]
    assert all(r["recall"] > 1 - 1e-5 and r["rel_error"] < 1e-5 for r in full)
    configs = [c for _, _, c in grid(SketchWalkConfig(), ["block_size"])]
    assert [(c.block_size, c.q_block) for c in configs] == [(64, 64), (128, 128), (64, 128)]


# --------------------------------------------------------------------------- batched greedy decoding
NEW = 12


def _prompts(lengths: list[int]) -> list[list[int]]:
    return [random_ids(1, n, seed=40 + i)[0].tolist() for i, n in enumerate(lengths)]


def _alone(model, rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    out = []
    for r in rows:
        flexwalk.reset_decode_state(model)
        new, _, _, finite = greedy(model, r, NEW, eos)
        assert finite
        out.append(new)
    return out


def _batched(model, rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    flexwalk.reset_decode_state(model)
    got, prefill, total = greedy_batch(model, rows, NEW, eos, pad_id=0)
    assert len(got) == len(rows) and 0 < prefill <= total and all(finite for _, finite in got)
    return [new for new, _ in got]


@torch.no_grad()
def _first_logits(model, row: list[int], pad: int) -> torch.Tensor:
    """Next-token logits after `row` left-padded by `pad` tokens (positions from the mask)."""
    mask = torch.tensor([[0] * pad + [1] * len(row)])
    ids = torch.tensor([[0] * pad + row])
    return model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[0, -1]


def _stopping_eos(model, row: list[int]) -> set[int]:
    """An EOS set under which this prompt stops early (at its 5th token): rows of a batch then
    stop at different steps, and the stopped ones are fed padding."""
    flexwalk.reset_decode_state(model)
    return {greedy(model, row, NEW, set())[0][4]}


def test_greedy_batch_of_one_is_greedy():
    """A batch of one row runs exactly what greedy runs: the same tokens, to max_new_tokens or
    up to and including the first EOS."""
    model = build_model("llama", "sdpa")
    (row,) = _prompts([150])
    for eos in (set(), _stopping_eos(model, row), {2}):
        assert _batched(model, [row], eos) == _alone(model, [row], eos)
    assert len(_alone(model, [row], _stopping_eos(model, row))[0]) == 5


@pytest.mark.parametrize("attn, density, sparse_decode", [
    ("sdpa", None, False), ("sketchwalk_flex", 0.3, False), ("sketchwalk_flex", 0.3, True),
    ("sketchwalk_flex", 1.0, False),
])
def test_greedy_batch_left_padding_matches_each_prompt_alone(attn, density, sparse_decode):
    """Three prompts of different lengths, left-padded into one batch: each row generates
    token for token what its prompt generates alone through greedy (fp32, exact equality).

    sketchwalk_flex at a sparse budget (block 16, dense_below=0, so every layer selects): the
    key block grid starts at the first padded position, and the selection counts its sink and
    local blocks from the first real token, so padding by whole blocks (lengths 150, 134, 118)
    selects exactly what the prompt selects alone.  Padding by a part of a block shifts the
    grid against the prompt: that is another valid selection (not a numerical difference, not
    leakage across rows or from padding), so a ragged row equals itself padded by one more
    whole block but not the prompt alone.  This is why `flexwalk niah run` batches only prompts
    of one token count for the sparse methods.  At full budget and under sdpa any padding
    gives the prompt's own tokens."""
    model = build_model("llama", "sdpa")
    if attn == "sketchwalk_flex":
        flexwalk.configure(model, SketchWalkConfig(block_size=16, density=density, dense_below=0, dense_layers=0,
                                                   skip_decode=not sparse_decode))
    sparse = attn == "sketchwalk_flex" and density < 1
    rows = _prompts([150, 134, 118] if sparse else [150, 110, 133])
    eos = _stopping_eos(model, rows[1])
    flexwalk.reset_counters()
    assert _batched(model, rows, eos) == _alone(model, rows, eos)
    counts = flexwalk.counters()
    if attn == "sketchwalk_flex":
        assert counts.get("sparse_prefill", 0) > 0
        assert (counts.get("sparse_decode", 0) > 0) == sparse_decode
    if sparse:  # ragged padding (5 and 21 tokens): depends only on the padding modulo the block size
        short = _prompts([150, 134, 118, 145])[3]
        by5 = _batched(model, [rows[0], short], eos)[1]
        by21 = _batched(model, [random_ids(1, 166, seed=9)[0].tolist(), short], eos)[1]
        assert by5 == by21
        # the first step's logits: whole blocks of padding change nothing, a part of a block
        # changes the selection (far beyond fp32 rounding), the same way for 5 and 21 tokens
        first = {pad: _first_logits(model, short, pad) for pad in (0, 5, 16, 21)}
        tol = floor_tol(first[0])
        assert (first[16] - first[0]).abs().max() <= tol and (first[21] - first[5]).abs().max() <= tol
        assert (first[5] - first[0]).abs().max() > 100 * tol


def test_batches_keep_cells_and_token_counts():
    samples = [{"task": t, "target_length": n, "index": i, "k": k}
               for (t, n, i, k) in [("a", 1, 0, 3), ("a", 1, 1, 2), ("a", 1, 2, 3), ("b", 1, 0, 3), ("a", 2, 0, 3),
                                    ("a", 1, 3, 3), ("a", 1, 4, 3)]]

    def tokenize(s):
        return [0] * s["k"]

    def shape(batches):
        return [[(s["task"], s["target_length"], s["index"]) for s, _ in b] for b in batches]

    assert shape(batches(samples, tokenize, 2, same_tokens=False)) == [
        [("a", 1, 0), ("a", 1, 1)], [("a", 1, 2), ("a", 1, 3)], [("a", 1, 4)], [("b", 1, 0)], [("a", 2, 0)]]
    assert shape(batches(samples, tokenize, 2, same_tokens=True)) == [
        [("a", 1, 0), ("a", 1, 2)], [("a", 1, 3), ("a", 1, 4)], [("a", 1, 1)], [("b", 1, 0)], [("a", 2, 0)]]
    assert all(len(b) == 1 for b in batches(samples, tokenize, 1, same_tokens=True))


# --------------------------------------------------------------------------- runner, end to end
def test_method_configs():
    base = SketchWalkConfig(density=0.2)
    assert method_config("sdpa", base) is None
    assert method_config("flex", base).density == 1.0
    assert method_config("one_hop", base).walk == "one_hop"
    assert method_config("walk", base) == base.replace(walk="damped")
    assert method_config("sketchwalk", base.replace(walk="walk")).walk == "walk"  # the configuration as given
    assert SketchWalkConfig().walk == "one_hop"  # the default rule; the walk is the `walk` method
    assert not method_config("walk", base.replace(prefill_scoring="sketch"), sparse_decode=True).skip_decode
    with pytest.raises(ValueError, match=r"walk='damped' is invalid: .*prefill_scoring='sketch'"):
        method_config("walk", base, sparse_decode=True)  # the decode state's W_l: the mean-key rule
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
    # a sparse method whose prompts are all below dense_below says its results are dense
    capsys.readouterr()
    assert cli_main(["niah", "run", "--data", str(data), "--out", str(tmp_path / "dense"), "--lengths", "640",
                     "--tasks", "niah_single_1", "--max-new-tokens", "2", "--limit", "1", "--methods", "sketchwalk",
                     "--config", '{"dense_below": 100000}']) == 0
    assert "sketchwalk ran no sparse layer" in capsys.readouterr().err


@pytest.mark.slow
def test_batched_run_on_smollm2_matches_batch_one_and_resumes(tmp_path, capsys):
    """`flexwalk niah run --batch-size 2` on the packaged model: the same predictions as batch 1
    (one prompt is made shorter so the dense batch is left-padded), records carry their batch,
    the sparse method batches only prompts of one token count, and a run killed mid-batch
    resumes with the missing samples only."""
    from flexwalk.niah.dataset import dataset_path, read_jsonl

    data = tmp_path / "data"
    assert cli_main(["niah", "generate", "--tasks", "niah_single_1", "--lengths", "640", "--samples", "3",
                     "--tokens-to-generate", "16", "--out", str(data)]) == 0
    path = dataset_path(data, 640, "niah_single_1")
    recs = read_jsonl(path)
    sentence = "The sky is blue. "
    assert sentence in recs[1]["input"]
    recs[1]["input"] = recs[1]["input"].replace(sentence, "", 1)  # a few tokens shorter: ragged padding
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = ["niah", "run", "--data", str(data), "--lengths", "640", "--tasks", "niah_single_1", "--methods",
           "sdpa,sketchwalk", "--max-new-tokens", "6", "--config", '{"dense_below": 256, "block_size": 64}']
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main([*run, "--out", str(one)]) == 0
    assert cli_main([*run, "--out", str(two), "--batch-size", "2"]) == 0

    def records(root, method):
        return {r["index"]: r for r in map(json.loads, (root / method / "samples.jsonl").read_text().splitlines())}

    for method, batches in (("sdpa", {0: 2, 1: 2, 2: 1}), ("sketchwalk", {0: 2, 1: 1, 2: 2})):
        single, batched = records(one, method), records(two, method)
        assert {i: r["pred"] for i, r in batched.items()} == {i: r["pred"] for i, r in single.items()}, method
        assert {i: r["batch"] for i, r in batched.items()} == batches, method
        assert all(r["batch"] == 1 and r["density_scope"] == "sample" for r in single.values())
        assert all(r["density_scope"] == ("batch" if r["batch"] > 1 else "sample") for r in batched.values())
        assert json.loads((two / method / "run.json").read_text())["batch_size"] == 2
    assert records(two, "sdpa")[1]["input_tokens"] < records(two, "sdpa")[0]["input_tokens"]
    pair = records(two, "sketchwalk")
    assert pair[0]["counters"] == pair[2]["counters"] and pair[0]["counters"].get("sparse_prefill", 0) > 0

    # killed while writing: the first record and part of the second are on disk
    sample_file = two / "sdpa" / "samples.jsonl"
    lines = sample_file.read_text().splitlines()
    kept = [json.loads(x)["index"] for x in lines[:1]]
    sample_file.write_text(lines[0] + "\n" + lines[1][:20])
    assert cli_main([*run, "--out", str(two), "--batch-size", "2", "--methods", "sdpa"]) == 0
    resumed = [json.loads(x) for x in sample_file.read_text().splitlines()]
    assert sorted(r["index"] for r in resumed) == [0, 1, 2]
    assert [r["batch"] for r in resumed if r["index"] not in kept] == [2, 2]  # the two missing ones, together
    assert json.loads((two / "sdpa" / "summary.json").read_text())["overall"]["n"] == 3
    with pytest.raises(SystemExit):
        cli_main([*run, "--out", str(two), "--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err


def test_run_errors_name_the_argument(tmp_path, capsys):
    assert cli_main(["niah", "run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--tasks",
                     "niah_single_1", "--lengths", "1k"]) == 2
    assert "no niah_single_1 data at length 1024" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["niah", "run", "--data", str(tmp_path), "--out", str(tmp_path), "--methods", "dense"])
    assert "--methods 'dense'" in capsys.readouterr().err


def test_resume_drops_a_partial_last_line_only(tmp_path):
    from flexwalk.niah.run import done_samples

    f = tmp_path / "samples.jsonl"
    good = json.dumps({"task": "niah_single_1", "length": 4096, "index": 3})
    f.write_text(good + "\n" + '{"task": "niah_sin')
    assert done_samples(f) == {("niah_single_1", 4096, 3)}
    assert f.read_text() == good + "\n"  # the partial record is gone; the sample runs again
    f.write_text('{"broken\n' + good + "\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        done_samples(f)


def test_fidelity_cli_writes_after_every_configuration(tmp_path, capsys):
    """`flexwalk niah fidelity` on the packaged model: a run interrupted part-way
    keeps every configuration it measured, marked incomplete; a finished run is
    marked complete and its density rises with the density it was given."""
    from flexwalk.cli import build_parser
    from flexwalk.niah.cli import fidelity_main
    from flexwalk.niah.fidelity import layer_fidelity

    data, out = tmp_path / "data", tmp_path / "fid"
    assert cli_main(["niah", "generate", "--tasks", "niah_single_2", "--lengths", "384", "--samples", "1",
                     "--tokens-to-generate", "16", "--out", str(data)]) == 0
    args = ["niah", "fidelity", "--data", str(data), "--lengths", "384", "--limit", "1", "--groups", "density",
            "--no-kl", "--config", '{"block_size": 32}', "--out", str(out)]
    calls = []

    def stop_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # an interrupted run: nothing is written after this
        return layer_fidelity(*a, **k)

    with pytest.raises(KeyboardInterrupt):
        fidelity_main(build_parser().parse_args(args), layer_fn=stop_at_third)
    partial = json.loads(out.with_suffix(".json").read_text())
    assert partial["meta"]["complete"] is False and len(partial["results"]) == 2
    assert "Incomplete:** 2 of 4" in out.with_suffix(".md").read_text()
    assert cli_main(args) == 0
    full = json.loads(out.with_suffix(".json").read_text())
    assert full["meta"]["complete"] is True and len(full["results"]) == 4
    dens = [r["density"] for r in full["results"]]
    assert dens == sorted(dens) and dens[0] < dens[-1]


def test_fidelity_groups_are_valid_configurations():
    """Every setting of `flexwalk niah fidelity --groups` is a valid change of the default
    configuration, and the sketch width group runs the mean-key rule, the only one it changes."""
    from flexwalk.niah.fidelity import ABLATIONS

    for name, settings in ABLATIONS.items():
        for fields in settings:
            assert SketchWalkConfig().replace(**fields) is not None, (name, fields)
    assert all(f["prefill_scoring"] == "sketch" for f in ABLATIONS["sketch_dim"])
    assert {f["prefill_scoring"] for f in ABLATIONS["prefill_scoring"]} == {"sketch", "bound"}
