import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexwalk.selection.sketch import (block_means, bound_scores, effective_sketch_dim, head_reduce, key_bounds,
                                      srht_matrix)


def test_srht_preserves_inner_products_in_expectation():
    """Fixed-seed statistical test: the mean of (xP).(yP) over many sketches is x.y."""
    g = torch.Generator().manual_seed(1)
    d, r, trials = 96, 16, 3000
    x, y = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    est = torch.stack([(x @ srht_matrix(d, r, s).double()) @ (y @ srht_matrix(d, r, s).double()) for s in range(trials)])
    exact = x @ y
    stderr = est.std() / trials**0.5
    assert abs(est.mean() - exact) < 4 * stderr, (est.mean().item(), exact.item(), stderr.item())
    # and a sketch is really an approximation (not exact) at r < d
    assert est.std() > 0.1 * abs(exact) + 1e-6


def test_srht_full_width_is_orthogonal_and_exact():
    p = srht_matrix(64, 64, seed=3).double()
    assert torch.allclose(p @ p.T, torch.eye(64, dtype=torch.float64), atol=1e-12)


def test_default_sketch_is_exact_at_any_head_dim():
    """sketch_dim=None (the default) is the padded head dim: the sketch preserves every inner
    product, so the selection's block scores carry no sketch error."""
    from flexwalk import SketchWalkConfig
    from flexwalk.selection.sketch import sketch_matrix

    assert SketchWalkConfig().sketch_dim is None
    assert [effective_sketch_dim(d, None) for d in (64, 80, 128, 256)] == [64, 128, 128, 256]
    g = torch.Generator().manual_seed(0)
    for d in (64, 80, 256):
        p = sketch_matrix(SketchWalkConfig(), 3, d, "cpu").double()
        x, y = torch.randn(5, d, generator=g, dtype=torch.float64), torch.randn(7, d, generator=g, dtype=torch.float64)
        # P is stored in float32: its rounding (eps32 per entry) is the only error allowed
        bound = 4 * torch.finfo(torch.float32).eps * x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :]
        assert (((x @ p) @ (y @ p).T - x @ y.T).abs() <= bound).all()
        # the exact sketch is [I 0]: the same in every layer, and xP is x without any rounding
        p32 = sketch_matrix(SketchWalkConfig(), 3, d, "cpu")
        assert torch.equal(p32, torch.eye(d, effective_sketch_dim(d, None)))
        assert sketch_matrix(SketchWalkConfig(sketch_dim=4096), 5, d, "cpu") is p32
        xf = x.float()
        assert torch.equal(xf @ p32, torch.cat([xf, xf.new_zeros(5, p32.shape[1] - d)], 1))  # x, then zeros
        narrow = sketch_matrix(SketchWalkConfig(sketch_dim=16), 3, d, "cpu").double()
        assert ((x @ narrow) @ (y @ narrow).T - x @ y.T).abs().max() > 0.1  # a real sketch is not exact


def test_srht_shape_clipping_and_determinism():
    assert effective_sketch_dim(80, 512) == 128  # padded head dim 128
    p = srht_matrix(80, 512, 0)
    assert p.shape == (80, 128)
    assert torch.equal(srht_matrix(80, 32, 5), srht_matrix(80, 32, 5))
    assert not torch.equal(srht_matrix(80, 32, 5), srht_matrix(80, 32, 6))
    assert set(srht_matrix(64, 16, 1).abs().unique().tolist()) == {0.25}


@given(
    n=st.integers(1, 200),
    bs=st.sampled_from([16, 32, 64]),
    pad=st.integers(0, 199),
    seed=st.integers(0, 1000),
)
def test_block_means_ignore_padding_and_partial_tail(n, bs, pad, seed):
    pad = min(pad, n - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 8, generator=g)
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, :pad] = False
    means, counts = block_means(x, bs, valid)
    x2 = x.clone()
    x2[0, :pad] = 1e6  # padding values must not matter
    means2, _ = block_means(x2, bs, valid)
    assert torch.equal(means, means2)
    for b in range((n + bs - 1) // bs):
        lo, hi = b * bs, min(n, (b + 1) * bs)
        real = [t for t in range(lo, hi) if valid[0, t]]
        assert counts[0, b].item() == len(real)
        if real:
            torch.testing.assert_close(means[0, b], x[0, real].mean(0))
        else:
            assert torch.all(means[0, b] == 0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 150), bs=st.sampled_from([16, 32]), hq=st.sampled_from([1, 4]), per_head=st.booleans(),
       pad=st.integers(0, 40), seed=st.integers(0, 10_000))
def test_bound_scores_bound_every_key_of_the_block(n, bs, hq, per_head, pad, seed):
    """prefill_scoring="bound": each score is >= q_mean . k for every real key k of the block, and
    equals it where the block holds one real key (the extremes are that key); padding keys never
    enter, and blocks without a real key score 0."""
    g = torch.Generator().manual_seed(seed)
    hk = 2 if hq == 4 else 1
    scoring = "per_head" if per_head else "mean"
    q = torch.randn(2, hq, n, 8, generator=g)
    k = torch.randn(2, hk, n, 8, generator=g)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, : min(pad, n)] = False
    qm, counts = block_means(head_reduce(q, scoring), bs, valid)
    a = bound_scores(qm, key_bounds(k, bs, valid, scoring))  # [B, Hq', nb, nb]
    kr = head_reduce(k, scoring)
    if per_head:
        kr = kr.repeat_interleave(hq // hk, dim=1)
    logits = qm @ kr.transpose(-1, -2)  # [B, Hq', nb, n]: every block mean against every key
    nb = counts.shape[1]
    for j in range(nb):
        keys = torch.arange(j * bs, min(n, (j + 1) * bs))
        for b in range(2):
            rk = keys[valid[b, keys]]
            if len(rk) == 0:
                assert torch.equal(a[b, :, :, j], torch.zeros_like(a[b, :, :, j]))
                continue
            best = logits[b, :, :, rk].amax(-1)
            assert (a[b, :, :, j] >= best - 1e-5).all()
            if len(rk) == 1:
                torch.testing.assert_close(a[b, :, :, j], best, rtol=1e-5, atol=1e-5)


def test_bound_scoring_finds_the_needle_the_block_mean_averages_away():
    """One key aligned with the query block's mean, in a block of keys pointing away: the block
    mean scores that block last, the bound first (a needle among distractors)."""
    bs, d = 16, 8
    q = torch.zeros(1, 1, 4 * bs, d)
    q[..., 0] = 1.0  # every query looks along channel 0
    k = torch.zeros(1, 1, 4 * bs, d)
    k[..., 1] = 1.0  # blocks 0-2: keys orthogonal to the queries
    k[:, :, bs:2 * bs, 0] = -0.2  # block 1: its mean points slightly away from the queries ...
    k[:, :, bs + 5, 0] = 3.0  # ... but one key points at them
    qm, _ = block_means(q, bs)
    a_bound = bound_scores(qm, key_bounds(k, bs, None, "mean"))[0, 0, 3, :3]
    km, _ = block_means(k, bs)
    a_mean = (qm @ km.transpose(-1, -2))[0, 0, 3, :3]
    assert int(a_bound.argmax()) == 1
    assert int(a_mean.argmin()) == 1
