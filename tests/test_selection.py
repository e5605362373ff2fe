"""Properties of the block selection (ALGORITHM.md steps 1-7)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import left_padding, random_qkv
from flexwalk import SketchWalkConfig, expected_density, sketchwalk_selection
from flexwalk.config import block_budget
from flexwalk.sketch import block_causal_mask
from flexwalk.walk import select_blocks, transition_matrix, walk_step

configs = st.builds(
    SketchWalkConfig,
    block_size=st.sampled_from([16, 32]),
    sketch_dim=st.sampled_from([8, 16, 64]),
    density=st.floats(0.05, 1.0),
    sink_blocks=st.integers(0, 2),
    local_blocks=st.integers(1, 3),
    dense_tail_blocks=st.integers(0, 2),
    walk=st.sampled_from(["walk", "damped", "one_hop"]),
    head_scoring=st.sampled_from(["mean", "per_head"]),
    seed=st.integers(0, 5),
)


def _check_selection(sel, cfg, key_valid, n):
    mask = sel.mask
    bsz, nb, _ = mask.shape
    idx = torch.arange(nb)
    bs = cfg.block_size
    if key_valid is None:
        key_valid = torch.ones(bsz, n, dtype=torch.bool)
    padded = torch.nn.functional.pad(key_valid, (0, nb * bs - n))
    block_valid = padded.reshape(bsz, nb, bs).any(-1)
    for b in range(bsz):
        valid_blocks = idx[block_valid[b]]
        first = valid_blocks[0].item()
        for i in range(nb):
            row = mask[b, i]
            chosen = idx[row]
            assert (chosen <= i).all(), "selection is not causal"
            assert row[i], "diagonal block missing"
            if i < first:
                assert chosen.tolist() == [i]  # fully padded query block: itself only
                continue
            assert block_valid[b, chosen].all(), "a block of pure padding was selected"
            causal = valid_blocks[valid_blocks <= i]
            sinks = causal[: cfg.sink_blocks]
            assert row[sinks].all(), "sink block missing"
            local = causal[causal > i - cfg.local_blocks]
            assert row[local].all(), "local block missing"
            forced = len(set(sinks.tolist()) | set(local.tolist()))
            if i >= nb - cfg.dense_tail_blocks:
                assert row.sum() == len(causal)
            else:
                assert row.sum() == block_budget(cfg, len(causal), forced), "budget not respected"
    counts, indices = sel.indices()
    for b in range(bsz):
        for i in range(nb):
            ids = indices[b, i, : counts[b, i]].tolist()
            assert len(ids) == len(set(ids)) == mask[b, i].sum()


@given(cfg=configs, n=st.integers(40, 300), pad=st.integers(0, 120), hkv=st.sampled_from([1, 2, 3]), g=st.sampled_from([1, 3]))
def test_selection_invariants(cfg, n, pad, hkv, g):
    pad = min(pad, n - 1)
    q, k, _ = random_qkv(2, hkv * g, hkv, n, 16, seed=n + pad)
    kv = left_padding(2, n, [0, pad])
    state = None
    for layer in range(3):  # state handed from layer to layer
        sel, state = sketchwalk_selection(q, k, cfg, layer, state, key_valid=kv)
        _check_selection(sel, cfg, kv, n)
        w = state.transition
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
        assert torch.all(w.triu(1) == 0), "walk is not block-causal"
        q, k = q.roll(7, 2), k.roll(3, 2)  # other layers see other activations


@given(n=st.integers(17, 400), bs=st.sampled_from([16, 32, 64]), density=st.floats(0.05, 1.0), tail=st.integers(0, 2))
def test_expected_density_equals_achieved(n, bs, density, tail):
    cfg = SketchWalkConfig(block_size=bs, density=density, dense_tail_blocks=tail)
    q, k, _ = random_qkv(1, 2, 2, n, 16, seed=n)
    sel, _ = sketchwalk_selection(q, k, cfg, 0)
    assert math.isclose(sel.density(), expected_density(cfg, n), rel_tol=1e-6)


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
    from flexwalk.walk import WalkState

    st_ = WalkState(prev, 0, 16, nb * 16)
    walked = prev @ w
    torch.testing.assert_close(walk_step(w, st_, SketchWalkConfig(walk="walk")), walked / walked.sum(-1, keepdim=True))
    torch.testing.assert_close(walk_step(w, st_, SketchWalkConfig(walk="one_hop")), w)
    damped = walk_step(w, st_, SketchWalkConfig(walk="damped", damping=0.25))
    torch.testing.assert_close(damped, 0.75 * w + 0.25 * walked / walked.sum(-1, keepdim=True))
    assert walk_step(w, None, SketchWalkConfig(walk="walk")) is w


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
    cfg = SketchWalkConfig(block_size=16, density=0.15, sketch_dim=8)
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
