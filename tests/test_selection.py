"""Properties of the block selection: sketch, walk and top-k."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import block_budget, left_padding, random_qkv
from flexwalk import SketchWalkConfig, expected_density, sketchwalk_selection
from flexwalk.selection.sketch import block_causal_mask
from flexwalk.selection.sketch import transition_matrix
from flexwalk.selection.topk import select_blocks
from flexwalk.selection.walk import walk_combine, walk_step

configs = st.builds(
    SketchWalkConfig,
    block_size=st.sampled_from([16, 32]),
    sketch_dim=st.sampled_from([8, 16, 64, None]),
    density=st.floats(0.05, 1.0),
    sink_blocks=st.integers(0, 2),
    local_blocks=st.integers(1, 3),
    dense_tail_blocks=st.integers(0, 2),
    walk=st.sampled_from(["walk", "damped", "one_hop"]),
    head_scoring=st.sampled_from(["mean", "per_head"]),
    seed=st.integers(0, 5),
)
# kernel query blocks of 2 or 4 selection blocks (query_block_size)
pooled_configs = st.builds(lambda cfg, m: cfg.replace(query_block_size=cfg.block_size * m), configs,
                           st.sampled_from([2, 4]))


def _check_selection(sel, cfg, key_valid, n):
    """Every kernel query block I (rows I*m .. I*m+m-1 of the walk, m = q_block / block_size; the
    block itself when m = 1): causal to its last sub-row, its m diagonal key blocks, sinks and
    local blocks kept, no pure-padding block, exactly the predicted budget, dense tail rows dense."""
    mask = sel.mask
    bs, m = cfg.block_size, cfg.q_block // cfg.block_size
    assert sel.q_block_size == cfg.q_block and sel.block_size == bs
    bsz, nq, nb = mask.shape
    assert nb == -(-n // bs) and nq == -(-nb // m)
    idx = torch.arange(nb)
    if key_valid is None:
        key_valid = torch.ones(bsz, n, dtype=torch.bool)
    padded = torch.nn.functional.pad(key_valid, (0, nb * bs - n))
    block_valid = padded.reshape(bsz, nb, bs).any(-1)
    for b in range(bsz):
        valid_blocks = idx[block_valid[b]]
        first = valid_blocks[0].item()
        for i in range(nq):
            row = mask[b, i]
            chosen = idx[row]
            last = min(i * m + m - 1, nb - 1)  # the block's last sub-row: its causal extent
            assert (chosen <= last).all(), "selection is not causal"
            if last < first:
                assert chosen.tolist() == [i * m]  # fully padded query block: its first diagonal only
                continue
            assert block_valid[b, chosen].all(), "a block of pure padding was selected"
            causal = valid_blocks[valid_blocks <= last]
            diagonal = causal[causal >= i * m]
            assert row[diagonal].all() and len(diagonal) >= 1, "diagonal block missing"
            sinks = causal[: cfg.sink_blocks]
            assert row[sinks].all(), "sink block missing"
            local = causal[causal >= (i - cfg.local_blocks + 1) * m]
            assert row[local].all(), "local block missing"
            forced = len(set(sinks.tolist()) | set(local.tolist()))
            if i >= nq - cfg.dense_tail_blocks:
                assert row.sum() == len(causal)
            else:
                assert row.sum() == block_budget(cfg, len(causal), forced), "budget not respected"
    counts, indices = sel.indices()
    for b in range(bsz):
        for i in range(nq):
            ids = indices[b, i, : counts[b, i]].tolist()
            assert len(ids) == len(set(ids)) == mask[b, i].sum()


def _check_layers(cfg, n, pad, hkv, g):
    pad = min(pad, n - 1)
    q, k, _ = random_qkv(2, hkv * g, hkv, n, 16, seed=n + pad)
    kv = left_padding(2, n, [0, pad])
    state = None
    for layer in range(3):  # state handed from layer to layer
        sel, state = sketchwalk_selection(q, k, cfg, layer, state, key_valid=kv)
        _check_selection(sel, cfg, kv, n)
        w = state.transition
        assert w.shape[-1] == w.shape[-2] == -(-n // cfg.block_size)  # the walk keeps block_size rows
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
        assert torch.all(w.triu(1) == 0), "walk is not block-causal"
        q, k = q.roll(7, 2), k.roll(3, 2)  # other layers see other activations


@given(cfg=configs, n=st.integers(40, 300), pad=st.integers(0, 120), hkv=st.sampled_from([1, 2, 3]), g=st.sampled_from([1, 3]))
def test_selection_invariants(cfg, n, pad, hkv, g):
    _check_layers(cfg, n, pad, hkv, g)


@given(cfg=pooled_configs, n=st.integers(40, 300), pad=st.integers(0, 120), hkv=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 3]))
def test_pooled_selection_invariants(cfg, n, pad, hkv, g):
    """query_block_size = 2 or 4 blocks: the same invariants per kernel query block."""
    _check_layers(cfg, n, pad, hkv, g)


@given(n=st.integers(17, 400), bs=st.sampled_from([16, 32, 64]), density=st.floats(0.05, 1.0), tail=st.integers(0, 2),
       m=st.sampled_from([1, 2, 4]), local=st.integers(1, 2))
def test_expected_density_equals_achieved(n, bs, density, tail, m, local):
    cfg = SketchWalkConfig(block_size=bs, density=density, dense_tail_blocks=tail, query_block_size=bs * m,
                           local_blocks=local)
    q, k, _ = random_qkv(1, 2, 2, n, 16, seed=n)
    sel, _ = sketchwalk_selection(q, k, cfg, 0)
    assert math.isclose(sel.density(), expected_density(cfg, n), rel_tol=1e-6)


def test_pooled_rows_rank_by_the_mean_of_their_walk_rows():
    """Kernel query block 3 (rows 6 and 7, m = 2) keeps sink 0, its diagonal blocks 6 and 7 and
    one free block: 3, first in the mean of the two rows though first in neither row alone."""
    nb = 8
    allowed = block_causal_mask(torch.ones(1, nb, dtype=torch.bool))
    walk = torch.zeros(1, nb, nb)
    walk[0, 6, [2, 3]] = torch.tensor([0.5, 0.4])
    walk[0, 7, [4, 3]] = torch.tensor([0.5, 0.4])
    cfg = SketchWalkConfig(block_size=16, query_block_size=32, density=None, top_k_blocks=4, sink_blocks=1,
                           local_blocks=1, dense_tail_blocks=0)
    sel = select_blocks(walk, allowed, torch.ones(1, nb, dtype=torch.bool), cfg, nb * 16)
    assert sel.mask.shape == (1, 4, nb) and sel.q_block_size == 32
    assert torch.arange(nb)[sel.mask[0, 3]].tolist() == [0, 3, 6, 7]
    assert torch.arange(nb)[sel.mask[0, 0]].tolist() == [0, 1]  # the first block: its two diagonal blocks
    # the same walk with 16-token query blocks: two free blocks per row, each row's own first
    square = select_blocks(walk, allowed, torch.ones(1, nb, dtype=torch.bool), cfg.replace(query_block_size=None),
                           nb * 16)
    assert torch.arange(nb)[square.mask[0, 6]].tolist() == [0, 2, 3, 6]
    assert torch.arange(nb)[square.mask[0, 7]].tolist() == [0, 3, 4, 7]
    # block_rows: the selection per 16-token query block (rows 6 and 7 both get block 3's row)
    rows = sel.block_rows()
    assert rows.shape == (1, nb, nb) and torch.equal(rows[0, 6], sel.mask[0, 3]) and torch.equal(rows[0, 7], rows[0, 6])


@given(n=st.integers(40, 300), bs=st.sampled_from([16, 32]), density=st.floats(0.05, 1.0), pad=st.integers(0, 100))
def test_query_block_size_equal_to_block_size_changes_nothing(n, bs, density, pad):
    """query_block_size=None and == block_size select exactly the same blocks (m = 1)."""
    pad = min(pad, n - 1)
    q, k, _ = random_qkv(2, 4, 2, n, 16, seed=n)
    kv = left_padding(2, n, [0, pad])
    cfg = SketchWalkConfig(block_size=bs, density=density, dense_tail_blocks=1)
    sa = sb = None
    for layer in range(2):
        a, sa = sketchwalk_selection(q, k, cfg, layer, sa, key_valid=kv)
        b, sb = sketchwalk_selection(q, k, cfg.replace(query_block_size=bs), layer, sb, key_valid=kv)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.kept, b.kept) and torch.equal(a.causal, b.causal)
        assert a.q_block_size == b.q_block_size == bs
        assert torch.equal(sa.transition, sb.transition)


def test_transition_and_walk_modes():
    torch.manual_seed(0)
    nb = 9
    allowed = block_causal_mask(torch.ones(1, nb, dtype=torch.bool))
    scores = torch.randn(1, nb, nb).masked_fill(~allowed, float("-inf"))
    w = transition_matrix(scores, 8.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, nb))
    assert torch.all(w.triu(1) == 0)
    torch.testing.assert_close(w, torch.softmax(8.0 * scores, -1))
    prev = transition_matrix(torch.randn(1, nb, nb).masked_fill(~allowed, float("-inf")), 1.0)
    from flexwalk.selection.walk import WalkState

    st_ = WalkState(prev, 0, 16, nb * 16)
    walked = prev @ w
    torch.testing.assert_close(walk_step(w, st_, SketchWalkConfig(walk="walk")), walked / walked.sum(-1, keepdim=True))
    torch.testing.assert_close(walk_step(w, st_, SketchWalkConfig(walk="one_hop")), w)
    damped = walk_step(w, st_, SketchWalkConfig(walk="damped", damping=0.25))
    torch.testing.assert_close(damped, 0.75 * w + 0.25 * walked / walked.sum(-1, keepdim=True))
    assert walk_step(w, None, SketchWalkConfig(walk="walk")) is w


@settings(max_examples=25, deadline=None)
@given(nb=st.integers(2, 12), steps=st.integers(1, 5), beta=st.floats(0.0, 1.0),
       mode=st.sampled_from(["walk", "damped", "one_hop"]), seed=st.integers(0, 1000))
def test_walk_steps_compose_the_one_step_rule(nb, steps, beta, mode, seed):
    """walk_steps=k is the one-step rule applied k times from R_{l-1}; the first sparse layer
    (no state) and one_hop give W_l; the result stays row-stochastic and block-causal; and each
    row follows from the same rows alone (what decode's single row relies on)."""
    g = torch.Generator().manual_seed(seed)
    allowed = block_causal_mask(torch.ones(2, nb, dtype=torch.bool))
    w = transition_matrix(torch.randn(2, nb, nb, generator=g).masked_fill(~allowed, float("-inf")), 4.0)
    prev = transition_matrix(torch.randn(2, nb, nb, generator=g).masked_fill(~allowed, float("-inf")), 1.0)
    from flexwalk.selection.walk import WalkState

    cfg = SketchWalkConfig(walk=mode, damping=beta, walk_steps=steps)
    got = walk_step(w, WalkState(prev, 0, 16, nb * 16), cfg)
    ref = prev
    for _ in range(steps if mode != "one_hop" else 0):
        ref = walk_step(w, WalkState(ref, 0, 16, nb * 16), cfg.replace(walk_steps=1))
    torch.testing.assert_close(got, w if mode == "one_hop" else ref)
    assert walk_step(w, None, cfg) is w
    torch.testing.assert_close(got.sum(-1), torch.ones(2, nb))
    assert torch.all(got.triu(1) == 0)
    i = nb - 1
    row = walk_combine(w[:, i : i + 1], prev[:, i : i + 1], w, mode, beta, steps)
    torch.testing.assert_close(row, got[:, i : i + 1])


def test_ties_break_towards_lower_block_index():
    nb = 12
    allowed = block_causal_mask(torch.ones(1, nb, dtype=torch.bool))
    flat = torch.ones(1, nb, nb)
    cfg = SketchWalkConfig(block_size=16, density=None, top_k_blocks=4, sink_blocks=1, local_blocks=1, dense_tail_blocks=0)
    sel = select_blocks(flat, allowed, torch.ones(1, nb, dtype=torch.bool), cfg, nb * 16)
    # row 10: sink 0 and diagonal 10 forced, then the two lowest remaining indices
    assert torch.arange(nb)[sel.mask[0, 10]].tolist() == [0, 1, 2, 10]


def test_selection_is_deterministic_and_seeded():
    q, k, _ = random_qkv(1, 4, 2, 512, 32, seed=3)
    cfg = SketchWalkConfig(block_size=16, density=0.15, sketch_dim=8, prefill_scoring="sketch")  # the SRHT's seed
    a, _ = sketchwalk_selection(q, k, cfg, 3)
    b, _ = sketchwalk_selection(q, k, cfg, 3)
    assert torch.equal(a.mask, b.mask)
    others = [sketchwalk_selection(q, k, cfg.replace(seed=s), 3)[0].mask for s in range(1, 6)]
    assert any(not torch.equal(a.mask, o) for o in others), "seed has no effect on the sketch"


def test_padded_row_selects_like_the_row_alone():
    n, bs, pad = 320, 32, 64
    q, k, _ = random_qkv(1, 4, 2, n, 16, seed=9)
    qp = torch.cat([torch.randn(1, 4, pad, 16), q], 2)
    kp = torch.cat([torch.randn(1, 2, pad, 16), k], 2)
    cfg = SketchWalkConfig(block_size=bs, density=0.3, sketch_dim=16)
    kv = left_padding(1, n + pad, [pad])
    s_alone = s_pad = None
    for layer in range(3):
        alone, s_alone = sketchwalk_selection(q, k, cfg, layer, s_alone)
        padded, s_pad = sketchwalk_selection(qp, kp, cfg, layer, s_pad, key_valid=kv)
        off = pad // bs
        assert torch.equal(padded.mask[0, off:, off:], alone.mask[0])
        assert not padded.mask[0, off:, :off].any()


def test_incompatible_state_is_refused():
    q, k, _ = random_qkv(1, 2, 2, 128, 16)
    cfg = SketchWalkConfig(block_size=16)
    _, state = sketchwalk_selection(q, k, cfg, 0)
    with pytest.raises(ValueError, match="seq_len=160"):
        sketchwalk_selection(*random_qkv(1, 2, 2, 160, 16)[:2], cfg, 1, state)


@settings(max_examples=20)
@given(cfg=configs, n=st.integers(40, 300), pad=st.integers(0, 30), exponent=st.floats(0.5, 32.0),
       scoring=st.sampled_from(["sketch", "bound"]))
def test_one_hop_with_mean_scoring_ignores_the_sparsity_exponent(cfg, n, pad, exponent, scoring):
    """softmax(s * A) is monotone in A along a row, so one-hop selection with head-mean scoring
    and one walk row per query block ranks by A whatever s (until exp underflows to a tie); the
    exponent matters for the walk, the per-head mean of transitions and pooled query blocks."""
    cfg = cfg.replace(walk="one_hop", head_scoring="mean", prefill_scoring=scoring)
    q, k, _ = random_qkv(2, 4, 2, n, 16, seed=n)
    kv = left_padding(2, n, [0, min(pad, n - 1)])
    a, _ = sketchwalk_selection(q, k, cfg, 3, key_valid=kv)
    b, _ = sketchwalk_selection(q, k, cfg.replace(sparsity_exponent=exponent), 3, key_valid=kv)
    assert torch.equal(a.mask, b.mask)
