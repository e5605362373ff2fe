"""BlockMask construction: structure, the mask_mod's own semantics, compile behaviour."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters as dynamo_counters
from torch.nn.attention.flex_attention import create_mask, flex_attention

from conftest import assert_matches_reference, left_padding, random_qkv
from flexwalk import SketchWalkConfig, sketchwalk_attention, sketchwalk_selection, token_mask
from flexwalk.kernels.flex import bucket_length, dense_block_mask, selection_block_mask


def _dense_blocks(bm, kind):
    """[B, nq, nk] bool table of a BlockMask's partial ('kv') or full ('full_kv') blocks."""
    cnt = getattr(bm, f"{kind}_num_blocks")[:, 0]
    idx = getattr(bm, f"{kind}_indices")[:, 0].long()
    b, nq, nk = idx.shape
    take = torch.arange(nk)[None, None] < cnt[..., None]
    return torch.zeros(b, nq, nk, dtype=torch.bool).scatter_(-1, idx, take)


@given(n=st.integers(20, 600), bs=st.sampled_from([16, 32, 64]), m=st.sampled_from([1, 2, 4]), pad=st.integers(0, 100),
       density=st.floats(0.05, 1))
def test_full_blocks_are_fully_allowed_and_partials_cover_the_rest(n, bs, m, pad, density):
    """Query blocks of qb = m * bs rows (query_block_size), key blocks of bs."""
    pad = min(pad, n - 1)
    qb = bs * m
    q, k, _ = random_qkv(2, 2, 2, n, 8, seed=n)
    kv = left_padding(2, n, [0, pad])
    cfg = SketchWalkConfig(block_size=bs, query_block_size=qb, density=density)
    sel, _ = sketchwalk_selection(q, k, cfg, 0, key_valid=kv)
    bm = selection_block_mask(sel, key_valid=kv)
    n_pad = bucket_length(n)
    assert bm.seq_lengths == (n_pad, n_pad) and n_pad % 256 == 0 and n_pad >= n
    assert bm.BLOCK_SIZE == (qb, bs)
    full, part = _dense_blocks(bm, "full_kv"), _dense_blocks(bm, "kv")
    assert not (full & part).any()
    # token-level truth of the selection, on the bucket grid
    m = torch.zeros(2, n_pad, n_pad, dtype=torch.bool)
    m[:, :n, :n] = token_mask(n, selection=sel, key_valid=kv)[:, 0]
    any_ = m.reshape(2, n_pad // qb, qb, n_pad // bs, bs).any(4).any(2)
    m_rows = m.clone()
    m_rows[:, n:] = True  # query rows past the sequence are computed and dropped: any value is fine
    all_ = m_rows.reshape(2, n_pad // qb, qb, n_pad // bs, bs).all(4).all(2)
    assert (any_ <= (full | part)).all(), "an allowed element lies in a block the kernel skips"
    assert (full <= all_).all(), "a full block holds a masked element"
    # the mask_mod alone encodes the whole selection (flex's eager path relies on it)
    dense = create_mask(bm.mask_mod, 2, 1, n_pad, n_pad, device="cpu")[:, 0]
    assert torch.equal(dense[:, :n, :n], m[:, :n, :n])


@pytest.mark.parametrize("qbs,window", [(None, None), (64, None), (None, 50)])
def test_token_mask_rows_are_the_rows_of_the_full_mask(qbs, window):
    """token_mask(rows=...) (the oracle of long prompts, row by row) is the full mask's rows."""
    q, k, _ = random_qkv(2, 4, 2, 300, 16, seed=5)
    kv = left_padding(2, 300, [0, 41])
    sel, _ = sketchwalk_selection(q, k, SketchWalkConfig(block_size=32, density=0.25, query_block_size=qbs), 0,
                                  key_valid=kv)
    rows = torch.tensor([0, 7, 40, 41, 63, 64, 200, 299])
    full = token_mask(300, selection=sel, key_valid=kv, window=window)
    part = token_mask(300, selection=sel, key_valid=kv, window=window, rows=rows)
    assert part.shape == (2, 1, len(rows), 300)
    assert torch.equal(part, full[:, :, rows])
    assert not full.all() and full.any()


@pytest.mark.parametrize("qbs", [None, 64])
def test_uncompiled_flex_with_our_mask_matches_the_oracle(qbs):
    """If flex ever fell back to its eager path it would still compute the selection."""
    q, k, v = random_qkv(1, 4, 2, 300, 16, seed=2)
    cfg = SketchWalkConfig(block_size=32, density=0.25, query_block_size=qbs)
    sel, _ = sketchwalk_selection(q, k, cfg, 0)
    bm = selection_block_mask(sel, bucket=False)
    assert bm.kv_num_blocks.shape[-1] == -(-300 // cfg.q_block) and bm.seq_lengths == (300, 300)
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    assert_matches_reference(q, k, v, token_mask(300, selection=sel), out)


def test_dense_block_mask_skips_padding_blocks():
    kv = left_padding(1, 512, [256])
    bm = dense_block_mask(1, 512, 512, 64, "cpu", key_valid=kv, bucket=False)
    full, part = _dense_blocks(bm, "full_kv"), _dense_blocks(bm, "kv")
    # real query blocks 4..7 never visit key blocks 0..3 (pure padding)
    assert not (full | part)[0, 4:, :4].any()
    # padding query blocks keep only their own diagonal (self-attention keeps rows finite)
    assert torch.equal((full | part)[0, :4, :4], torch.eye(4, dtype=torch.bool))


def test_bucket_length_bounds_padding_and_compiles():
    for n in [1, 255, 256, 257, 1000, 4097, 70000, 131072]:
        b = bucket_length(n)
        assert b >= n and b % 256 == 0 and (b - n) <= max(256, n // 4)
    assert len({bucket_length(n) for n in range(4096, 8193)}) <= 5


def test_no_recompiles_across_prompt_lengths_after_warmup():
    cfg = SketchWalkConfig(block_size=32, density=0.2, dense_layers=0, dense_below=0)
    lengths = [1030, 1100, 1170, 1200, 1234, 1260, 1280, 1111, 1059, 1025]  # one bucket: 1280

    def run(n):
        q, k, v = random_qkv(1, 4, 2, n, 16, seed=n)
        return sketchwalk_attention(q, k, v, cfg, 3)[0]

    run(1029)
    before = dynamo_counters["stats"]["unique_graphs"]
    for n in lengths:
        assert torch.isfinite(run(n)).all()
    assert dynamo_counters["stats"]["unique_graphs"] == before, "a prompt length recompiled flex"


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=4))
def test_key_bounds_recovers_each_rows_interval(intervals):
    """Left, right and two-sided padding, rows with no real key, bounds past 127 (an int8
    argmax once wrapped there when compiled on CUDA)."""
    from flexwalk.kernels.flex import key_bounds

    s = 300
    kv = torch.zeros(len(intervals), s, dtype=torch.bool)
    for b, (a, e) in enumerate(intervals):
        kv[b, min(a, e):max(a, e)] = True
    start, end = key_bounds(kv)
    for b, (a, e) in enumerate(intervals):
        lo, hi = min(a, e), max(a, e)
        assert (int(start[b]), int(end[b])) == ((lo, hi) if hi > lo else (s, s))
