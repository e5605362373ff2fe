"""The prefill selection on CUDA: flexwalk's Triton selection against the torch selection, the
CUDA-graphed selection against the ungraphed one, and no Triton compile per prompt length.

    python -m pytest -q tests/gpu/test_gpu_selection.py      # needs a CUDA GPU (make test-gpu)

Two selections may break a tie at the budget's edge differently (their sums run in other
orders): a row may then keep another block of equal score, with the same count.  Every other
row's blocks, every list, bound and count must be equal, and so must the layer's output on the
rows whose blocks are equal.  CPU runs skip it all.
"""

from __future__ import annotations

import pytest
import torch

import flexwalk
from flexwalk import sketchwalk_attention
from flexwalk.selection.driver import fused_selection
from gpu_inputs import inputs, prefill_counts, sparse_config, triton_kernels_compiled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYERS = 3


def _layers(q, k, v, cfg, kv, **options):
    """LAYERS layers (the walk carried; the inputs rolled between layers) under `options`: per
    layer the selection's tables, walk, kept and causal counts, and the layer's output."""
    out = []
    with flexwalk.options(**options):
        st = None
        for layer in range(LAYERS):
            tables, _, kept, causal = fused_selection(q, k, cfg, layer, st, key_valid=kv)
            y, st = sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=kv)
            out.append(([t.clone() for t in tables], st.transition.clone(), kept.clone(), causal.clone(), y))
            q, k, v = (t.roll(4099, 2) for t in (q, k, v))
    return out


def _assert_same_selection(got, ref, q_block: int, padding: int):
    """Each layer's selections equal but for ties (at most 1% of the rows, the same count kept),
    and the outputs equal on every real row of the query blocks whose selections are equal."""
    for layer, ((tg, wg, kg, cg, yg), (tr, wr, kr, cr, yr)) in enumerate(zip(got, ref)):
        table_g, table_r = tg[4].bool(), tr[4].bool()
        assert table_g.shape == table_r.shape, layer
        differ = (table_g != table_r).any(-1)  # [B, (heads,) query blocks]
        assert int(differ.sum()) <= max(1, differ.numel() // 100), (layer, int(differ.sum()), differ.numel())
        assert torch.equal(table_g.sum(-1), table_r.sum(-1)), f"layer {layer}: a row kept another number of blocks"
        same = ~differ
        for a, b in zip(tg[:4], tr[:4]):  # partial / full counts and indices, on the rows that agree
            assert torch.equal(a[same], b[same]), layer
        assert torch.equal(tg[5], tr[5]) and torch.equal(tg[6], tr[6]), f"layer {layer}: row bounds differ"
        nb = min(wg.shape[-1], wr.shape[-1])
        walk_diff = (wg[..., :nb, :nb] - wr[..., :nb, :nb]).abs().max().item()
        assert walk_diff <= 1e-5, (layer, walk_diff)
        assert torch.equal(kg, kr) and torch.equal(cg, cr), layer
        agree = same.reshape(same.shape[0], -1, same.shape[-1]).all(1)  # [B, query blocks], every head agreeing
        n = yg.shape[2]
        for b in range(yg.shape[0]):
            rows = agree[b].repeat_interleave(q_block)[:n].clone()
            if b == yg.shape[0] - 1:
                rows[:padding] = False
            assert torch.equal(yg[b][:, rows], yr[b][:, rows]), f"layer {layer}, row {b}: outputs differ"
        assert bool(torch.isfinite(yg[-1][:, padding:]).all())


# (blocks, query heads, KV heads, head dim, tokens, head scoring, padded): the 8B shape, SmolLM2's
# and Gemma 3's, 128-row query blocks over 64-token keys, 200K tokens (above the longest graphed
# bucket: the Triton selection without a graph against the compiled torch one), per-head scoring,
# key blocks scored by their key extremes (prefill_scoring="bound", head-mean and per head)
TRITON_CASES = [
    ("128", 32, 8, 128, 30000, "mean", False), ("64", 9, 3, 64, 20000, "mean", False),
    ("128", 32, 8, 128, 8000, "mean", True), ("128", 32, 8, 128, 30000, "mean", True),
    ("64", 9, 3, 64, 20000, "mean", True), ("q128kv64", 32, 8, 128, 20000, "mean", True),
    ("128", 32, 8, 128, 200000, "mean", False), ("64", 4, 1, 256, 5000, "mean", True),
    ("128", 32, 8, 128, 20000, "per_head", True), ("64", 4, 1, 256, 5000, "per_head", True),
    ("128", 32, 8, 128, 30000, "bound", True), ("64", 9, 3, 64, 8000, "bound", False),
    ("128", 32, 8, 128, 20000, "bound_per_head", True),
]


def _scoring(scoring: str) -> dict:
    """A case's scoring as config fields: "mean", "per_head", "bound" (head-mean), "bound_per_head"."""
    head = "per_head" if scoring.endswith("per_head") else "mean"
    return {"head_scoring": head, "prefill_scoring": "bound" if scoring.startswith("bound") else "sketch"}


def _id(case):
    spec, hq, hkv, d, n, scoring, padded = case
    return f"{spec}-h{hq}x{hkv}-d{d}-n{n}-{scoring}" + ("-padded" if padded else "")


@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
def test_the_triton_selection_equals_the_torch_selection(case):
    """Options.triton_selection on and off (each graphed where it can be), three layers, bf16,
    batch 2 with the last row left-padded (batch 1 unpadded: the graph without bounds)."""
    spec, hq, hkv, d, n, scoring, padded = case
    pad = n // 3 if padded else 0
    q, k, v, kv = inputs(2 if padded else 1, hq, hkv, n, d, pad=pad, seed=n + d)
    cfg = sparse_config(spec, dense_tail_blocks=2, **_scoring(scoring))
    flexwalk.reset_counters()
    got = _layers(q, k, v, cfg, kv, triton_selection=True)
    assert prefill_counts()["triton_selection"] >= 2 * LAYERS  # the selections and the layers' own
    ref = _layers(q, k, v, cfg, kv, triton_selection=False)
    _assert_same_selection(got, ref, cfg.q_block, pad)


@pytest.mark.parametrize("spec,hq,hkv,d", [("128", 32, 8, 128), ("64", 9, 3, 64), ("q128kv64", 32, 8, 128)])
@pytest.mark.parametrize("n", [3000, 8000, 20000])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("scoring", ["sketch", "bound"])
def test_the_graphed_selection_equals_the_ungraphed(spec, hq, hkv, d, n, triton, scoring):
    """Options.graph_selection on and off, with the Triton selection and with the torch one
    (ungraphed on CUDA: compiled with a dynamic length), three layers, batch 2, left padding;
    block scores from the sketch and from the key extremes."""
    pad = n // 7
    q, k, v, kv = inputs(2, hq, hkv, n, d, pad=pad, seed=n)
    cfg = sparse_config(spec, dense_tail_blocks=2, prefill_scoring=scoring)
    got = _layers(q, k, v, cfg, kv, triton_selection=triton, graph_selection=True)
    ref = _layers(q, k, v, cfg, kv, triton_selection=triton, graph_selection=False)
    _assert_same_selection(got, ref, cfg.q_block, pad)


def test_lengths_of_one_power_of_two_block_count_compile_no_triton_kernel():
    """The Triton selection's kernels are specialised to the block count's power of two, not to
    the length: after a prompt of 20000 tokens (157 blocks of 128: 256), prompts of 24000-32768
    tokens compile nothing (a new length bucket only captures a graph)."""
    cfg = sparse_config("128")

    def run(n):
        q, k, v, _ = inputs(1, 32, 8, n, 128, seed=n)
        st = None
        for layer in range(2):
            _, st = sketchwalk_attention(q, k, v, cfg, layer, st)

    with flexwalk.options(prefill_kernel="triton"):
        run(20000)
        torch.cuda.synchronize()
        before = triton_kernels_compiled()
        flexwalk.reset_counters()
        for n in (24000, 27001, 30000, 32768):
            run(n)
        torch.cuda.synchronize()
    assert triton_kernels_compiled() == before
    assert prefill_counts()["triton_selection"] == 8 and prefill_counts()["triton_prefill"] == 8
