"""The fused selection-to-mask path (compiled once with dynamic shapes on CUDA): equal to the
eager selection and the oracle, and no recompiles across prompt lengths after warm-up."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

import flexwalk
from flexwalk.selection import driver
from conftest import graph_inputs, random_qkv
from flexwalk import SketchWalkConfig
from flexwalk.reference import eager_sketchwalk_attention


@pytest.fixture
def compiled_on_cpu():
    with flexwalk.options(compile_selection="always"):
        yield


def test_oracle_selection_is_never_compiled(compiled_on_cpu):
    """walk="oracle" runs the eager selection where the others compile (counted as
    compiled_selection): compiling its chunk loop over a dynamic length took minutes per process
    on the GPU."""
    q, k, v = random_qkv(1, 4, 2, 200, 16, seed=1)
    oracle = SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=0, walk="oracle")
    out, _ = flexwalk.sketchwalk_attention(q, k, v, oracle, 0, None)
    ref, _, _ = eager_sketchwalk_attention(q, k, v, oracle, 0, None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert "compiled_selection" not in flexwalk.counters()
    flexwalk.sketchwalk_attention(q, k, v, oracle.replace(walk="damped"), 0, None)
    assert flexwalk.counters()["compiled_selection"] == 1


@pytest.mark.parametrize("walk,qbs", [("damped", None), ("oracle", None), ("damped", 32)])
def test_compiled_fused_selection_matches_the_oracle(compiled_on_cpu, walk, qbs):
    """Three layers (walk state carried), GQA 3, left padding, a length off the block grid;
    qbs: query blocks of two key blocks (query_block_size)."""
    cfg = SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=0, walk=walk,
                           query_block_size=qbs)
    q, k, v = random_qkv(2, 6, 2, 301, 16, seed=3)
    kv = torch.ones(2, 301, dtype=torch.bool)
    kv[1, :133] = False  # past 127: inductor on CUDA once computed this bound in int8
    st = ref_st = None
    for layer in range(3):
        out, st = flexwalk.sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=kv)
        ref, ref_st, _ = eager_sketchwalk_attention(q, k, v, cfg, layer, ref_st, key_valid=kv)
        torch.testing.assert_close(st.transition, ref_st.transition, rtol=0, atol=1e-6)
        real = kv[:, None, :, None]
        err = ((out - ref) * real).abs().max().item()
        assert err <= 4 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item()) * 16


@pytest.mark.parametrize("qbs", [None, 64])
def test_one_compile_across_lengths(compiled_on_cpu, qbs):
    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_below=0, dense_layers=0, query_block_size=qbs)

    def run(n):
        q, k, v = random_qkv(1, 4, 2, n, 16, seed=n)
        flexwalk.sketchwalk_attention(q, k, v, cfg, 1, None)

    for n in (260, 270, 290):  # warm-up: the dynamic graph and its first specialisations
        run(n)
    before = dynamo_counters["stats"]["unique_graphs"]
    for n in (257, 263, 271, 280, 288, 295, 300, 313, 320, 333):  # one flex bucket (384), ten lengths
        run(n)
    assert dynamo_counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("n,pad_left,compiled,qbs", [(301, 0, False, None), (333, 40, False, None),
                                                     (256, 0, False, None), (270, 133, False, None),
                                                     (333, 40, True, None), (301, 0, False, 32),
                                                     (270, 133, False, 64), (333, 40, True, 32)])
def test_bucket_padded_selection_equals_the_exact_length_one(n, pad_left, compiled, qbs):
    """The CUDA-graph path (driver.SelectionGraph) runs `torch_selection_tables` on head-mean
    inputs padded to the bucket, with the real length as a 0-d tensor and key_valid False past
    it, so that one graph serves every length of a bucket.  CPU check of that logic: over three
    layers (walk carried, dense tail on) every output equals the exact-length selection's.
    compiled: the function the graph captures with COMPILE_GRAPHED_SELECTION (inductor, the
    bucket's static shapes, a code object of its own).  qbs: query_block_size, the tables then
    have query blocks of qbs tokens over key blocks of 16."""
    from flexwalk.kernels.flex import bucket_length
    from flexwalk.selection.sketch import sketch_matrix

    cfg = SketchWalkConfig(block_size=16, density=0.25, dense_below=0, dense_layers=0, dense_tail_blocks=2,
                           local_blocks=2, query_block_size=qbs)
    bsz, d = 2, 16
    q, k, _ = random_qkv(bsz, 6, 2, n, d, seed=n)
    kv = torch.ones(bsz, n, dtype=torch.bool)
    kv[1, :pad_left] = False
    n_pad = bucket_length(n)
    nb, nb_pad = -(-n // 16), n_pad // 16
    nq = -(-n // cfg.q_block)  # real kernel query blocks
    qm, km, valid = graph_inputs(q, k, kv, n_pad)  # the graph's static inputs
    prev = prev_pad = None
    graphed = torch.compile(driver.own_selection_tables(cfg), dynamic=False) if compiled else None
    for layer in range(3):
        p = sketch_matrix(cfg, layer, d, "cpu")
        ref = driver.torch_selection_tables(q, k, p, prev, kv, cfg, layer, None, n_pad)
        if compiled:
            got = graphed(qm, km, p, prev_pad, valid, layer, None, n_pad, torch.tensor(n))
        else:
            got = driver.torch_selection_tables(qm, km, p, prev_pad, valid, cfg, layer, None, n_pad,
                                              seq_len=torch.tensor(n))
        names = ["p_cnt", "p_idx", "f_cnt", "f_idx", "table", "start", "end"]
        for name, a, b in zip(names, ref[:7], got[:7]):
            if name.endswith("idx"):  # indices past each row's count are an unspecified order
                cnt = ref[names.index(name) - 1]
                live = torch.arange(a.shape[-1]) < cnt[..., None]
                a, b = a * live, b * live
            if name == "table":  # past the real blocks the padded rows keep their diagonal; never read
                assert a.shape == b.shape == (bsz, n_pad // cfg.q_block, nb_pad)
                a, b = a[:, :nq, :nb], b[:, :nq, :nb]
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(got[7][:, :nb, :nb], ref[7], rtol=0, atol=2e-6)  # walk
        torch.testing.assert_close(got[8], ref[8], rtol=0, atol=0)  # kept
        torch.testing.assert_close(got[9], ref[9], rtol=0, atol=0)  # causal
        prev = ref[7]
        prev_pad = torch.zeros(bsz, nb_pad, nb_pad)
        prev_pad[:, :nb, :nb] = got[7][:, :nb, :nb]


def test_compiled_selection_keeps_each_configuration_static(compiled_on_cpu):
    """Two configurations (block sizes 16 and 32) alternating through the compiled selection
    stay correct.  On CUDA, passing the configuration as an argument let automatic dynamic shapes
    make the block size symbolic on the second configuration and inductor failed (CantSplit); CPU
    inductor tiles it anyway, so the regression itself is checked on the GPU
    (tests/gpu/test_gpu_selection.py, the graphed against the ungraphed selection)."""
    q, k, v = random_qkv(1, 4, 2, 300, 16, seed=1)
    for bs in (16, 32, 16, 32):
        cfg = SketchWalkConfig(block_size=bs, density=0.3, dense_below=0, dense_layers=0)
        out, _ = flexwalk.sketchwalk_attention(q, k, v, cfg, 1, None)
        ref, _, _ = eager_sketchwalk_attention(q, k, v, cfg, 1, None)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_torch_selection_graph_fill_holds_the_head_means(padded):
    """driver.SelectionGraph of the torch kind (the graph when Triton is off) without its
    CUDA graph: `fill` writes the head means, validity, length, P and walk into the static
    inputs, and `_run` (what the graph captures) gives the selection of those inputs, across two
    lengths of one bucket (longer, then shorter: nothing of the longer prompt stays) and two
    layers with the walk carried, whatever the sketch width."""
    from flexwalk.kernels.flex import bucket_length
    from flexwalk.selection.sketch import sketch_matrix

    cfg = SketchWalkConfig(block_size=16, density=0.25, dense_below=0, dense_layers=0, sketch_dim=8)
    bsz, d, hq, hk = 2, 16, 6, 2
    n_pad = bucket_length(250)
    graph = driver.SelectionGraph(bsz, n_pad, 1, 1, d, 8, cfg, True, True, None, torch.device("cpu"), "torch",
                                      capture=False)
    for n in (250, 170):
        q, k, _ = random_qkv(bsz, hq, hk, n, d, seed=n)
        kv = torch.ones(bsz, n, dtype=torch.bool)
        kv[1, :37] = False
        prev = torch.eye(n_pad // 16).expand(bsz, -1, -1).contiguous()
        for layer in range(2):
            qm, km, valid = graph_inputs(q, k, kv if padded else torch.ones(bsz, n, dtype=torch.bool), n_pad)
            p = sketch_matrix(cfg, layer, d, "cpu")
            ref = driver.torch_selection_tables(qm, km, p, prev, valid, cfg, 0, None, n_pad, seq_len=torch.tensor(n))
            graph.fill(q, k, p, prev, kv if padded else None)
            assert int(graph.n) == n and torch.equal(graph.valid, valid) and torch.equal(graph.p, p)
            torch.testing.assert_close(graph.qm, qm, rtol=0, atol=0)
            torch.testing.assert_close(graph.km, km, rtol=0, atol=0)
            got = graph._run()
            for a, b in zip(ref, got):
                assert torch.equal(a, b)
            prev = ref[7]
            q, k = q.roll(7, 2), k.roll(5, 2)


@pytest.mark.parametrize("qbs", [None, 64])
def test_fused_block_selection_is_the_selection_the_tables_hold(qbs):
    """fused_block_selection (the oracle's view of a layer's own selection) holds the blocks of
    the fused tables: on the CPU, the torch selection's, padding included."""
    n = 333
    q, k, _ = random_qkv(2, 4, 2, n, 16, seed=4)
    kv = torch.ones(2, n, dtype=torch.bool)
    kv[1, :50] = False
    cfg = SketchWalkConfig(block_size=32, density=0.3, dense_below=0, dense_layers=0, query_block_size=qbs)
    st_a = st_b = None
    for layer in range(2):
        got, st_a = driver.fused_block_selection(q, k, cfg, layer, st_a, key_valid=kv)
        ref, st_b = flexwalk.sketchwalk_selection(q, k, cfg, layer, st_b, key_valid=kv)
        assert got.mask.shape == ref.mask.shape == (2, -(-n // cfg.q_block), -(-n // 32))
        assert torch.equal(got.mask, ref.mask) and got.q_block_size == cfg.q_block and got.seq_len == n
        assert got.density() == pytest.approx(ref.density()) and not got.mask.all()


@pytest.mark.parametrize("head_scoring", ["mean", "per_head"])
def test_a_selection_inductor_cannot_compile_runs_uncompiled_and_is_counted(compiled_on_cpu, head_scoring):
    """Where inductor fails on the torch selection (here its Triton CPU backend, which has no
    driver on a machine without a GPU), the selection runs uncompiled - the same tables as the
    eager one - counted once per input signature, and no compile is tried again for it."""
    import torch._inductor.config as inductor_config

    cfg = SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=0, head_scoring=head_scoring,
                           seed=7001 if head_scoring == "mean" else 7002)  # configs no other test compiled
    q, k, _ = random_qkv(2, 4, 2, 300, 16, seed=3)
    kv = torch.ones(2, 300, dtype=torch.bool)
    kv[1, :100] = False
    flexwalk.reset_counters()
    with inductor_config.patch(cpu_backend="triton"):
        got = [driver.fused_selection(q, k, cfg, 0, None, key_valid=kv)[0] for _ in range(2)]
    assert flexwalk.counters() == {"selection_compile_failed": 1}
    with flexwalk.options(compile_selection="never"):
        ref = driver.fused_selection(q, k, cfg, 0, None, key_valid=kv)[0]
    for tables in got:
        assert all(torch.equal(a, b) for a, b in zip(tables, ref))
