"""flexwalk.kernels.triton_selection against the torch selection it replaces (selection.driver.torch_selection_tables)
and, through sparse prefill, against the eager oracle.  On CPU the kernels run in triton's
interpreter (conftest); the CUDA graph that captures them on a GPU is checked by
tests/gpu/test_gpu_selection.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexwalk
from flexwalk.selection import driver
from conftest import assert_matches_reference, graph_inputs, random_qkv
from flexwalk import SketchWalkConfig, eager_sketchwalk_attention, token_mask
from flexwalk.kernels import triton_selection as TS
from flexwalk.kernels.flex import bucket_length
from flexwalk.selection.sketch import sketch_matrix
from flexwalk.selection.topk import pool_rows

pytestmark = pytest.mark.skipif(not TS.HAS_TRITON, reason="triton is not installed")

NAMES = ["p_cnt", "p_idx", "f_cnt", "f_idx", "table", "start", "end", "walk", "kept", "causal"]


def _rows_tie(ref_walk, cfg, ref_table, got_table, tol=1e-5):
    """Rows where the two tables differ: the blocks swapped must tie in the torch walk's pooled
    score to float rounding (the two sum in another order)."""
    m = cfg.q_block // cfg.block_size
    score = ref_walk if m == 1 else pool_rows(ref_walk, m)
    for b, i in (ref_table != got_table).any(-1).nonzero().tolist():
        swapped = (ref_table[b, i] ^ got_table[b, i]).nonzero().flatten()
        s = score[b, i, swapped]
        assert float(s.max() - s.min()) <= tol, (b, i, swapped.tolist(), s.tolist())
        assert int(ref_table[b, i].sum()) == int(got_table[b, i].sum())


def _assert_same_selection(ref, got, cfg):
    """Every output equal (indices past a row's count included: both are a stable argsort), the
    walk to float32 rounding; rows with a tie at the budget's edge may swap the tied blocks."""
    for name, a, b in zip(NAMES, ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(got[7], ref[7], rtol=0, atol=2e-6)  # walk
    _rows_tie(ref[7], cfg, ref[4], got[4])
    same_rows = (ref[4] == got[4]).all(-1)  # [B, nq]
    for name, a, b in zip(NAMES[:7], ref[:7], got[:7]):
        if a.dim() >= 2 and a.shape[:2] == same_rows.shape:
            a, b = a[same_rows], b[same_rows]
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(got[8], ref[8], rtol=0, atol=0)  # kept
    torch.testing.assert_close(got[9], ref[9], rtol=0, atol=0)  # causal


@settings(max_examples=10)
@given(
    n=st.integers(40, 420),
    bs=st.sampled_from([16, 32]),
    m=st.sampled_from([1, 2, 4]),
    walk=st.sampled_from(["damped", "walk", "one_hop"]),
    steps=st.integers(1, 3),
    budget=st.one_of(st.floats(0.05, 1.0), st.integers(1, 9)),
    sink=st.integers(0, 2),
    local=st.integers(1, 3),
    tail=st.integers(0, 2),
    pad=st.integers(0, 90),
    right=st.booleans(),
    batch=st.sampled_from([1, 2]),
    d=st.sampled_from([16, 24, 32]),
    r=st.sampled_from([8, 16, 32, None]),  # None: the default, exact sketch
    short=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_triton_selection_equals_torch(n, bs, m, walk, steps, budget, sink, local, tail, pad, right, batch, d, r, short,
                                       seed):
    """Three layers, walk carried, on the graph's bucket-padded inputs (real length as a 0-d
    tensor): any block and query-block size, walk rule and walk_steps, density or top-k budget, sink, local and
    dense-tail blocks, left or right padding, head dims that are not powers of two; short: the
    padded row has fewer real tokens than dense_below (it keeps every causal block)."""
    qbs = bs * m if bs * m <= 256 else None
    kw = dict(density=budget) if isinstance(budget, float) else dict(top_k_blocks=budget)
    cfg = SketchWalkConfig(block_size=bs, query_block_size=qbs, walk=walk, walk_steps=steps, sink_blocks=sink,
                           local_blocks=local, dense_tail_blocks=tail, dense_below=0, dense_layers=0, sketch_dim=r,
                           seed=seed % 7, **kw)
    q, k, _ = random_qkv(batch, 4, 2, n, d, seed=seed)
    kv = torch.ones(batch, n, dtype=torch.bool)
    pad = min(pad, n - 1)
    if short:
        cfg = cfg.replace(dense_below=n - pad + 1)
    if right:
        kv[-1, n - pad:] = False
    else:
        kv[-1, :pad] = False
    n_pad = bucket_length(n)
    while n_pad % cfg.q_block:
        n_pad += 256
    qm, km, valid = graph_inputs(q, k, kv, n_pad)
    prev = None
    for layer in range(3):
        p = sketch_matrix(cfg, layer, d, "cpu")
        ref = driver.torch_selection_tables(qm, km, p, prev, valid, cfg, layer, None, n_pad, seq_len=torch.tensor(n))
        got = TS.selection_tables(qm, km, p, prev, valid, cfg, None, n_pad, seq_len=torch.tensor(n))
        _assert_same_selection(ref, got, cfg)
        prev = ref[7]


@pytest.mark.parametrize("with_valid", [False, True])
def test_exact_length_inputs(with_valid):
    """The path without a graph (above GRAPH_SELECTION_MAX_TOKENS): head means over the real n
    tokens only, the length an int, no validity when nothing is padded."""
    cfg = SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=0, query_block_size=32)
    n = 301
    q, k, _ = random_qkv(2, 4, 2, n, 32, seed=3)
    kv = torch.ones(2, n, dtype=torch.bool)
    if with_valid:
        kv[0, :37] = False
    n_pad = bucket_length(n)
    qm, km, valid = graph_inputs(q, k, kv, n_pad)
    p = sketch_matrix(cfg, 4, 32, "cpu")
    ref = driver.torch_selection_tables(qm, km, p, None, valid, cfg, 4, None, n_pad, seq_len=torch.tensor(n))
    got = TS.selection_tables(q, k, p, None, kv if with_valid else None, cfg, None, n_pad)  # heads reduced inside
    _assert_same_selection(ref, got, cfg)


def test_ties_go_to_the_lower_block():
    """Equal scores (zero queries and keys: a uniform softmax) keep the lowest blocks, as a
    stable sort does: the top-k is a bisection on the scores' bits, not a sort."""
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=4, sink_blocks=0, local_blocks=1, dense_tail_blocks=0,
                           dense_below=0, dense_layers=0, walk="one_hop")
    n_pad = 256
    qm = torch.zeros(1, 1, n_pad, 16)
    km = torch.zeros(1, 1, n_pad, 16)
    p = sketch_matrix(cfg, 0, 16, "cpu")
    got = TS.selection_tables(qm, km, p, None, None, cfg, None, n_pad)
    table = got[4][0]
    for i in range(16):
        want = sorted({*range(min(3, i)), i})  # three lowest blocks plus the forced diagonal
        assert table[i].nonzero().flatten().tolist() == want, i
    ref = driver.torch_selection_tables(qm, km, p, None, None, cfg, 0, None, n_pad)
    assert torch.equal(ref[4], table[None])


@pytest.mark.parametrize("n,pad,m,walk", [(301, 0, 1, "damped"), (333, 40, 2, "damped"), (270, 133, 4, "walk"),
                                          (200, 17, 1, "one_hop")])
@pytest.mark.parametrize("head_scoring,prefill_scoring", [("per_head", "sketch"), ("mean", "bound"),
                                                          ("per_head", "bound")])
def test_torch_scored_selection_equals_torch(n, pad, m, walk, head_scoring, prefill_scoring):
    """head_scoring="per_head" (each head's block means and sketches) and prefill_scoring="bound"
    (block means against key extremes): the scores are torch ops, the softmax kernel averages the
    heads' rows, then the same rank kernel; three layers with the walk carried, on the
    bucket-padded raw q and k."""
    cfg = SketchWalkConfig(block_size=16, query_block_size=16 * m, density=0.25, dense_below=0, dense_layers=0,
                           head_scoring=head_scoring, prefill_scoring=prefill_scoring, walk=walk,
                           dense_tail_blocks=2)
    q, k, _ = random_qkv(2, 6, 2, n, 16, seed=n)
    kv = torch.ones(2, n, dtype=torch.bool)
    kv[1, :pad] = False
    n_pad = bucket_length(n)
    qp = torch.nn.functional.pad(q, (0, 0, 0, n_pad - n))
    kp = torch.nn.functional.pad(k, (0, 0, 0, n_pad - n))
    valid = torch.nn.functional.pad(kv, (0, n_pad - n), value=False)
    prev = None
    for layer in range(3):
        p = sketch_matrix(cfg, layer, 16, "cpu")
        ref = driver.torch_selection_tables(qp, kp, p, prev, valid, cfg, layer, None, n_pad, seq_len=torch.tensor(n))
        got = TS.selection_tables(qp, kp, p, prev, valid, cfg, None, n_pad, seq_len=torch.tensor(n))
        _assert_same_selection(ref, got, cfg)
        got_exact = TS.selection_tables(q, k, p, prev, kv, cfg, None, n_pad)  # real length only, as the GPU runs it
        _assert_same_selection(ref, got_exact, cfg)
        prev = ref[7]


@pytest.mark.parametrize("scoring", ["mean", "per_head", "bound"])
def test_sparse_prefill_with_triton_selection_equals_the_oracle(scoring):
    """The whole CUDA pipeline on CPU: the Triton selection (triton_selection_on_cpu: the path
    without a graph) feeding the Triton prefill kernel its tables directly, no BlockMask, over
    three layers with left padding, against the eager oracle's token mask of the same selection."""
    with flexwalk.options(triton_selection_on_cpu=True, prefill_kernel="triton"):
        _triton_pipeline_equals_the_oracle(scoring)


def _triton_pipeline_equals_the_oracle(scoring):
    cfg = SketchWalkConfig(block_size=16, query_block_size=32, density=0.3, dense_below=0, dense_layers=0,
                           head_scoring="mean" if scoring == "bound" else scoring,
                           prefill_scoring="bound" if scoring == "bound" else "sketch")
    n = 200
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=11)
    kv = torch.ones(2, n, dtype=torch.bool)
    kv[1, :29] = False
    flexwalk.reset_counters()
    state = ref_state = None
    for layer in range(3):
        out, state = flexwalk.sketchwalk_attention(q, k, v, cfg, layer, state, key_valid=kv)
        _, ref_state, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, ref_state, key_valid=kv)
        assert_matches_reference(q, k, v, token_mask(n, selection=sel, key_valid=kv), out)
        nb = ref_state.transition.shape[-1]  # the Triton walk covers the bucket's blocks
        torch.testing.assert_close(state.transition[:, :nb, :nb], ref_state.transition, rtol=0, atol=2e-6)
        q, k = q.roll(7, 2), k.roll(5, 2)  # another layer's inputs
    counts = flexwalk.counters()
    assert counts["triton_selection"] == 3 and counts["triton_prefill"] == 3


def test_supported_and_errors():
    cfg = SketchWalkConfig(block_size=16, dense_below=0)
    assert TS.supported(cfg, 4096, "cpu") == TS.interpreted()
    assert TS.supported(SketchWalkConfig(block_size=16, head_scoring="per_head"), 4096, "cpu") == TS.interpreted()
    assert not TS.supported(SketchWalkConfig(block_size=16, walk="oracle"), 4096, "cpu")
    assert not TS.supported(cfg, 16 * (TS.MAX_BLOCKS + 16), "cpu")
    q = torch.zeros(1, 1, 100, 16)
    p = sketch_matrix(cfg, 0, 16, "cpu")
    with pytest.raises(ValueError, match="n_pad=64"):
        TS.selection_tables(q, q, p, None, None, cfg, None, 64)
    with pytest.raises(ValueError, match="4096"):
        TS.selection_tables(q, q, p, None, None, cfg, None, 16 * (TS.MAX_BLOCKS + 16))


def test_budget_table_is_the_budget_rule_and_cached():
    """The kernel's budget per causal-block count is selection.topk.block_budget's rule (float64 ceil: 20, not
    the 21 a float32 0.2 would give at 100 blocks), built once per configuration and block count."""
    from flexwalk.selection.topk import fraction_count

    cfg = SketchWalkConfig(block_size=16, density=0.2)
    table = TS.budget_table(cfg, 300, torch.device("cpu"))
    assert table.dtype == torch.int32 and table.shape == (301,)
    assert torch.equal(table, fraction_count(torch.arange(301, dtype=torch.int32), 0.2))
    assert int(table[100]) == 20
    assert TS.budget_table(cfg, 300, torch.device("cpu")) is table
    top = TS.budget_table(SketchWalkConfig(block_size=16, top_k_blocks=7), 300, torch.device("cpu"))
    assert torch.equal(top, torch.full((301,), 7, dtype=torch.int32))


@settings(max_examples=8)
@given(
    n=st.integers(1, 200),
    hq=st.integers(1, 9),
    hk=st.integers(1, 5),
    d=st.sampled_from([8, 24, 64]),
    bs=st.sampled_from([16, 32]),
    layout=st.sampled_from(["bhnd", "bnhd"]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    pad=st.integers(0, 60),
    extra=st.integers(0, 3),
    seed=st.integers(0, 10_000),
)
def test_block_parts_are_the_block_sums_of_the_head_means(n, hq, hk, d, bs, layout, dtype, pad, extra, seed):
    """One pass over q and k: the parts summed over their head groups, / (heads x count), are
    sketch.block_means of the fp32 head means, for any head count (groups of PARTS_HEADS, the
    last one short), head dim, storage layout ([B, n, H, D] memory, as transformers' RoPE leaves
    it) and left padding; blocks past n (a bucket's) are zero with count 0.  The validity and
    the length written for the graph (valid_out, n_out) are the input's, False past n."""
    from flexwalk.selection.sketch import block_means

    g = torch.Generator().manual_seed(seed)
    shape = lambda h: (2, h, n, d) if layout == "bhnd" else (2, n, h, d)  # noqa: E731
    q, k = (torch.randn(*shape(h), generator=g).to(dtype) for h in (hq, hk))
    if layout == "bnhd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    kv = torch.ones(2, n, dtype=torch.bool)
    kv[1, :min(pad, n - 1)] = False
    nb = -(-n // bs) + extra
    valid_out = torch.ones(2, nb * bs, dtype=torch.bool)
    n_out = torch.zeros((), dtype=torch.int64)
    qp, kp, counts = TS.block_parts(q, k, kv, bs, nb, valid_out=valid_out, n_out=n_out)
    assert qp.shape == (2, TS.parts_groups(hq, hk)[0], nb, d) and kp.shape[1] == TS.parts_groups(hq, hk)[1]
    for x, parts, h in ((q, qp, hq), (k, kp, hk)):
        want, want_counts = block_means(x.float().mean(1), bs, kv)
        got = parts.sum(1) / (h * counts.clamp_min(1))[..., None]
        # fp32 sums of at most bs x 9 terms, in another order than the reference's
        torch.testing.assert_close(got[:, :want.shape[1]], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[:, want.shape[1]:], torch.zeros_like(got[:, want.shape[1]:]))
        torch.testing.assert_close(counts[:, :want.shape[1]], want_counts.expand(2, -1), rtol=0, atol=0)
    assert not counts[:, -(-n // bs):].any()
    assert torch.equal(valid_out[:, :n], kv) and not valid_out[:, n:].any() and int(n_out) == n



@settings(max_examples=8)
@given(
    n=st.integers(1, 200),
    hk=st.integers(1, 5),
    d=st.sampled_from([8, 24, 64]),
    bs=st.sampled_from([16, 32]),
    layout=st.sampled_from(["bhnd", "bnhd"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    pad=st.integers(0, 60),
    extra=st.integers(0, 3),
    seed=st.integers(0, 10_000),
)
def test_bucket_key_bounds_are_the_key_bounds_of_the_head_means(n, hk, d, bs, layout, dtype, pad, extra, seed):
    """prefill_scoring="bound" in one launch: bucket_key_bounds equals selection.sketch.key_bounds
    of the fp32 head-mean keys ([max, -min] over each block's valid tokens), for any KV head
    count, head dim, layout and left padding, in a fresh buffer or the graph's; blocks past n (a
    bucket's) and blocks without a valid token are zero."""
    from flexwalk.selection.sketch import key_bounds

    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*((2, hk, n, d) if layout == "bhnd" else (2, n, hk, d)), generator=g).to(dtype)
    if layout == "bnhd":
        k = k.transpose(1, 2)
    kv = torch.ones(2, n, dtype=torch.bool)
    kv[1, :min(pad, n - 1)] = False
    nb = -(-n // bs) + extra
    want = key_bounds(k, bs, kv, "mean")
    graph_buffer = torch.full((2, 1, nb, 2 * d), float("nan"))
    for got in (TS.bucket_key_bounds(k, bs, kv, nb), TS.bucket_key_bounds(k, bs, kv, nb, out=graph_buffer)):
        assert got.shape == (2, 1, nb, 2 * d) and got.dtype == torch.float32
        # the mean of at most 5 fp32 terms, in another order than torch.mean's
        torch.testing.assert_close(got[:, :, :want.shape[2]], want, rtol=1e-6, atol=1e-6)
        assert not got[:, :, want.shape[2]:].any()
    assert graph_buffer.data_ptr() == TS.bucket_key_bounds(k, bs, kv, nb, out=graph_buffer).data_ptr()
    with pytest.raises(ValueError, match="cover fewer than n"):
        TS.bucket_key_bounds(k, bs, kv, (n - 1) // bs)
    with pytest.raises(ValueError, match="must be contiguous fp32"):
        TS.bucket_key_bounds(k, bs, kv, nb, out=torch.zeros(2, 1, nb + 1, 2 * d))

@pytest.mark.parametrize("padded,qbs,r,scoring", [(False, None, None, "sketch"), (True, 32, 8, "sketch"),
                                                  (True, 32, 8, "bound"), (False, None, None, "bound")])
def test_selection_graph_halves_equal_the_torch_selection(padded, qbs, r, scoring):
    """selection.driver.SelectionGraph of the Triton kind without its CUDA graph: `fill` (one
    block_parts launch into the static inputs) then `_run` (what the graph captures), reused
    across two lengths of one bucket, longer then shorter, and two layers with the walk carried: the tables equal
    the torch selection's on the bucket-padded head means (what the other graph kinds hold), and
    nothing of a longer prompt leaks into a shorter one's replay.  Without padding the graph holds no validity (no bounds kernel).
    The exact sketch (r None) needs no P in the graph; a narrower one (r = 8) is written by `fill`.
    The walk and density sums come out in one buffer, which `kept_outputs` copies once.
    prefill_scoring="bound": `fill` writes the keys' block extremes, and the graph holds the exact
    sketch whatever sketch_dim says (the scores read the query blocks' means)."""
    cfg = SketchWalkConfig(block_size=16, density=0.25, dense_below=0, dense_layers=0, dense_tail_blocks=2,
                           local_blocks=2, query_block_size=qbs, sketch_dim=r, prefill_scoring=scoring)
    bsz, d, hq, hk = 2, 16, 6, 2
    n_pad = bucket_length(250)
    graph = None
    for n in (250, 170):
        assert bucket_length(n) == n_pad
        q, k, _ = random_qkv(bsz, hq, hk, n, d, seed=n)
        kv = torch.ones(bsz, n, dtype=torch.bool)
        kv[1, :37] = False
        kv = kv if padded else None
        if graph is None:
            p0 = sketch_matrix(cfg, 0, d, "cpu")
            graph = driver.SelectionGraph(bsz, n_pad, hq, hk, d, p0.shape[1], cfg, True, padded, None,
                                      torch.device("cpu"), "triton", capture=False)
            assert (graph.valid is not None) == padded
        prev = None
        for layer in range(2):
            qm, km, valid = graph_inputs(q, k, kv if padded else torch.ones(bsz, n, dtype=torch.bool), n_pad)
            p = sketch_matrix(cfg, layer, d, "cpu")
            ref = driver.torch_selection_tables(qm, km, p, prev, valid, cfg, layer, None, n_pad, seq_len=torch.tensor(n))
            graph.fill(q, k, p, prev if prev is not None else torch.eye(n_pad // 16).expand(bsz, -1, -1), kv)
            if prev is None:  # the graph was built with a walk input: the first layer runs one-hop
                got = TS.parts_selection_tables(graph.qp, graph.kp, graph.counts, hq, hk, graph.p, None,
                                                graph.valid, cfg, None, n_pad, graph.n, k_bounds=graph.k_bounds)
            else:
                got = graph.out = graph._run()
                kept = graph.kept_outputs()
                for a, b in zip(kept, got[7:]):
                    assert torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                assert len({t.untyped_storage().data_ptr() for t in kept}) == 1  # one copy
            assert graph.exact == (r is None or scoring == "bound")
            assert (graph.k_bounds is not None) == (scoring == "bound")
            assert int(graph.n) == n
            _assert_same_selection(ref, got, cfg)
            prev = ref[7]
            q, k = q.roll(7, 2), k.roll(5, 2)
