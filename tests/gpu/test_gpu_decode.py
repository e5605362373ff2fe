"""Sparse decode on CUDA: generate() at full budget against sdpa, the split-KV Triton kernel
against the oracle in every dtype, CUDA-graphed and compiled steps against eager ones, and no
compile while decoding.

    python -m pytest -q tests/gpu/test_gpu_decode.py      # needs a CUDA GPU (make test-gpu)

CPU runs skip it all.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

import flexwalk
from flexwalk import DecodeState, SketchWalkConfig, sketchwalk_decode
from flexwalk.kernels.triton_decode import sparse_decode_attention
from flexwalk.reference import reference_error_budget
from test_triton_decode import random_selection, token_mask as decode_token_mask
from tiny_models import build_model, random_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL = SketchWalkConfig(block_size=16, density=1.0, dense_below=0, dense_layers=1, skip_decode=False)
GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)


def _prompt():
    ids = random_ids(2, 100, seed=1).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    return ids, mask


def _assert_the_same_greedy_tokens(ref, got, prompt_len: int, tol: float):
    """Two generate() outputs (with scores) agree: while their tokens agree so far, every step's
    logits within `tol` of the largest logit's magnitude, and a token differs only where the
    reference's two best logits are that close (a tie that rounding may break either way)."""
    for step, (a, b) in enumerate(zip(ref.scores, got.scores)):
        if not torch.equal(ref.sequences[:, : prompt_len + step], got.sequences[:, : prompt_len + step]):
            break  # the prefixes differ: later logits are of other inputs
        real = torch.isfinite(a)  # min_new_tokens masks the end-of-text token with -inf
        scale = max(1.0, a[real].abs().max().item())
        assert torch.equal(real, torch.isfinite(b)), step
        diff = (a[real] - b[real]).abs().max().item()
        assert diff <= tol * scale, (step, diff, tol * scale)
        for row in (ref.sequences[:, prompt_len + step] != got.sequences[:, prompt_len + step]).nonzero()[:, 0]:
            top = a[row].topk(2).values
            assert (top[0] - top[1]).item() <= 2 * tol * scale, (step, int(row), top.tolist())


TOL = {"fp32": 1e-4, "bf16": 0.02}  # of the largest logit (at least 1): fp32 rounding; ~2.5 bf16 ulps


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kernel", ["auto", "flex"])
def test_generate_at_full_budget_equals_sdpa(dtype, cache, kernel):
    """A tiny Llama generating 16 tokens after a left-padded batch, every sparse layer at density
    1: sdpa's tokens and logits, through the Triton decode kernel ("auto" on CUDA) and flex; with
    a static cache transformers compiles the forward by itself and the steps replay CUDA graphs."""
    ids, mask = _prompt()
    ref = build_model("llama", "sdpa", DTYPES[dtype]).cuda()
    model = flexwalk.configure(build_model("llama", "sketchwalk_flex", DTYPES[dtype]).cuda(), FULL,
                               decode_kernel=kernel)
    gen = dict(GEN, attention_mask=mask, cache_implementation=None if cache == "dynamic" else "static",
               output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = ref.generate(ids, **gen)
        flexwalk.reset_counters()
        b = model.generate(ids, **gen)
    _assert_the_same_greedy_tokens(a, b, ids.shape[1], TOL[dtype])
    if dtype == "fp32":
        assert torch.equal(a.sequences, b.sequences)
    c = flexwalk.counters()
    assert c.get("sparse_decode", 0) > 0, c
    assert (c.get("triton_decode", 0) > 0) == (kernel == "auto"), c


DECODE_CASES = [  # (head dim, query heads per KV head, block, cache tokens, softcap, splits)
    (128, 4, 128, 5000, None, None), (64, 8, 64, 3001, 30.0, 3), (256, 2, 128, 777, None, 1),
    (128, 1, 64, 4096, 50.0, None), (128, 7, 128, 20000, None, 5),
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"d{c[0]}-g{c[1]}-block{c[2]}-s{c[3]}")
def test_the_triton_decode_kernel_matches_the_oracle(dtype, case):
    """The split-KV kernel on a random selection against SDPA under the selection's token mask,
    within the dtype's reference error (soft-capping included)."""
    d, group, bs, s, softcap, splits = case
    g = torch.Generator().manual_seed(s)  # a seed whose selection leaves a row with keys in every case
    bsz, hkv = 3, 2
    q = torch.randn(bsz, hkv * group, 1, d, generator=g).to(DTYPES[dtype])
    k = torch.randn(bsz, hkv, s, d, generator=g).to(DTYPES[dtype])
    v = torch.randn(bsz, hkv, s, d, generator=g).to(DTYPES[dtype])
    kv_num, kv_idx, start, end = random_selection(g, bsz, s, bs, 0.3)
    mask = decode_token_mask(kv_num, kv_idx, start, end, s, bs)
    keep = mask.any(-1).reshape(bsz)  # rows with a key to attend; the others read 0
    out = sparse_decode_attention(*(t.cuda() for t in (q, k, v, kv_num, kv_idx, start, end)), block_size=bs,
                                  softcap=softcap, splits=splits).cpu()
    assert out.shape == q.shape and out.dtype == q.dtype and out[~keep].eq(0).all()
    assert keep.any(), "the random selection left every row empty: the case checks nothing"
    err, budget = reference_error_budget(q[keep], k[keep], v[keep], mask[keep], out[keep], softcap=softcap)
    assert err <= budget, (err, budget)


def _graphed_and_eager_steps(cfg, key_valid=None, counters=("decode_graph_steps",)):
    """40 steps of the functional API over a static layout of 3,000 slots (2,900 prefilled),
    each replayed from a CUDA graph and run eagerly; asserts equal outputs and walk rows at
    every step.  Returns the two states and the counters summed over the steps, per mode."""
    q, k, v = (torch.randn(2, h, 3000, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8))
    kv = None if key_valid is None else key_valid[:, :2900]
    states = {g: DecodeState.from_prefill(q[:, :, :2900], k[:, :, :2900], cfg, 3, kv_tokens=3000, growable=False,
                                          key_valid=kv) for g in (True, False)}
    summed = {g: dict.fromkeys(counters, 0) for g in states}
    for t in range(2900, 2940):
        outs = {}
        for g, st in states.items():
            flexwalk.reset_counters()
            with flexwalk.options(decode_graphs=g):
                out, row = sketchwalk_decode(q[:, :, t : t + 1].clone(), k, v, st,
                                             position=torch.tensor(t, device="cuda"))
            outs[g] = (out.clone(), row.clone())
            for name in counters:
                summed[g][name] += flexwalk.counters().get(name, 0)
        assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1]), t
    return states, summed


def test_a_graphed_decode_step_equals_the_eager_one():
    """40 steps, the step replayed from a CUDA graph and run eagerly: the same outputs, walk rows
    and final state (the key bounds picked, equal)."""
    states, summed = _graphed_and_eager_steps(SketchWalkConfig(block_size=128, density=0.2, decode_dense_steps=0))
    assert summed[True]["decode_graph_steps"] >= 38  # every step after the first (which captures) replays
    for field in ("k_sum", "k_count", "k_sketch", "q_sum", "q_count", "transition"):
        assert torch.equal(getattr(states[True], field), getattr(states[False], field)), field
    a, b = states[True].k_bounds, states[False].k_bounds
    assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_a_graphed_step_turns_a_short_padded_row_dense_as_the_eager_one():
    """Row 1 left-padded to 2,000 real tokens, dense_below 2,020: the graphed and the eager steps
    give the same outputs and walk rows, and both count row 1's first 19 steps (2,001 to 2,019
    real tokens, the new one included) as dense."""
    key_valid = torch.ones(2, 3000, dtype=torch.bool, device="cuda")
    key_valid[1, :900] = False
    cfg = SketchWalkConfig(block_size=128, density=0.2, dense_below=2020, decode_dense_steps=0)
    _, summed = _graphed_and_eager_steps(cfg, key_valid, counters=("decode_graph_steps", "dense_decode_short_rows"))
    assert summed[True]["decode_graph_steps"] >= 38
    assert summed[True]["dense_decode_short_rows"] == summed[False]["dense_decode_short_rows"] == 19


def test_graphed_dense_first_steps_equal_the_eager_ones():
    """decode_dense_steps=5: the graphed and the eager steps agree at every step across the
    switch from dense to selecting steps (the graph recaptured once), both count 5 dense steps."""
    cfg = SketchWalkConfig(block_size=128, density=0.2, decode_dense_steps=5)
    _, summed = _graphed_and_eager_steps(cfg, counters=("decode_graph_steps", "dense_decode_first"))
    assert summed[True]["decode_graph_steps"] >= 37  # all but the two capturing steps replay
    assert summed[True]["dense_decode_first"] == summed[False]["dense_decode_first"] == 5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_generate_with_decode_graphs_equals_without(dtype):
    """generate() with a static cache at full budget, the steps replayed from CUDA graphs and run
    eagerly: the same tokens, the same logits."""
    ids, mask = _prompt()
    model = flexwalk.configure(build_model("llama", "sketchwalk_flex", DTYPES[dtype]).cuda(), FULL)
    runs = {}
    for graphs in (True, False):
        flexwalk.reset_counters()
        with flexwalk.options(decode_graphs=graphs), torch.no_grad():
            runs[graphs] = model.generate(ids, attention_mask=mask, cache_implementation="static",
                                          output_scores=True, return_dict_in_generate=True, **GEN)
        assert (flexwalk.counters().get("decode_graph_steps", 0) > 0) == graphs
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].scores, runs[False].scores):
        assert torch.equal(a, b)


def test_a_compiled_decode_step_equals_the_eager_one():
    """20 steps over a growing cache, the step's state update and selection compiled (CUDA's
    default) and eager (compile_decode="never"): outputs equal to fp32 rounding."""
    q, k, v = (torch.randn(2, h, 600, 128, device="cuda") for h in (32, 8, 8))
    cfg = SketchWalkConfig(block_size=64, density=0.2, decode_dense_steps=0)
    st_a = DecodeState.from_prefill(q[:, :, :500], k[:, :, :500], cfg, 3)
    st_b = DecodeState.from_prefill(q[:, :, :500], k[:, :, :500], cfg, 3)
    for t in range(500, 520):
        a, _ = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], st_a)
        with flexwalk.options(compile_decode="never"):
            b, _ = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], st_b)
        diff = (a - b).abs().max().item()
        assert diff <= 1e-4 * max(1.0, b.abs().max().item()), (t, diff)


def test_no_compiles_while_decoding():
    """After one generate(), two more (other prompt lengths, 64 sparse decode steps each) compile
    no new dynamo graph."""
    model = flexwalk.configure(build_model("llama", "sketchwalk_flex", torch.bfloat16).cuda(),
                               FULL.replace(density=0.2, dense_layers=0))
    gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(random_ids(1, 70, seed=2).cuda(), **gen)
        before = dynamo_counters["stats"]["unique_graphs"]
        flexwalk.reset_counters()
        model.generate(random_ids(1, 70, seed=3).cuda(), **gen)
        model.generate(random_ids(1, 90, seed=4).cuda(), **gen)
    assert dynamo_counters["stats"]["unique_graphs"] == before
    assert flexwalk.counters().get("sparse_decode", 0) > 0
