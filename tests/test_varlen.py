"""The varlen API: a packed batch (FlashAttention's layout, cu_seqlens) equals its sequences run alone.

Hypothesis draws one to four sequences of 0-300 tokens (some below dense_below, one possibly
empty), GQA, fp32 or bf16, two layers (the walk carried per sequence), and the flex or Triton
kernel (Triton through its interpreter on the CPU).  For every sequence of the batch:

- it equals its solo `sketchwalk_attention` run (its own selection and walk; dense below
  dense_below) to a few ulps;
- it equals the eager oracle (the same selection as a dense token mask, SDPA) within the
  dtype's reference error budget;
- at full budget it equals SDPA's causal attention over that sequence within the same budget.

Tensor parallelism runs on two gloo ranks.  FlashAttention 4 is checked through the stand-in of tests/test_fa4_prefill.py (its call's block
lists and the output).  Flex runs eagerly in the fuzz (each draw is a new shape); one test runs
it compiled and checks that one kernel serves batches of other lengths in the same bucket.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flexwalk
from flexwalk.reference import error_budget, reference_error_budget
from flexwalk import SketchWalkConfig, VarlenWalkState, eager_sketchwalk_attention, sketchwalk_varlen_attention
from flexwalk.kernels.flex import clear_flex_functions, flex_functions
from flexwalk.reference import token_mask
from test_fa4_prefill import CALLS, fake_fa4  # noqa: F401  (the FA4 stand-in fixture)

BS = 16
HEAD_DIM = 16
DENSE_BELOW = 64


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def packed_inputs(lens, hq, hkv, dtype, seed, layer):
    g = torch.Generator().manual_seed(seed * 2 + layer)
    total = sum(lens)
    q, k, v = (torch.randn(total, h, HEAD_DIM, generator=g).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v


def cu_seqlens(lens, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=dtype)


def sequences(lens):
    """(index, rows) of each non-empty sequence."""
    at = 0
    for i, n in enumerate(lens):
        if n:
            yield i, slice(at, at + n)
        at += n


def solo(t, rows):
    """The [1, H, n, D] tensor of one sequence of a packed [total, H, D] one."""
    return t[rows].transpose(0, 1)[None]


def check_batch(lens, hq, hkv, dtype, seed, config, layers=2):
    """Run the packed batch and every sequence alone; return the largest error against the oracle
    (or SDPA at full budget) and assert each bound."""
    cu = cu_seqlens(lens)
    state, solo_states, oracle_states = None, {}, {}
    worst = 0.0
    for layer in range(layers):
        q, k, v = packed_inputs(lens, hq, hkv, dtype, seed, layer)
        out, state = sketchwalk_varlen_attention(q, k, v, cu, max(lens), config, layer, state)
        assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
        assert isinstance(state, VarlenWalkState) and state.seq_lens == tuple(lens)
        for i, rows in sequences(lens):
            qs, ks, vs = solo(q, rows), solo(k, rows), solo(v, rows)
            got = out[rows].transpose(0, 1)[None]
            alone, solo_states[i] = flexwalk.sketchwalk_attention(qs, ks, vs, config, layer, solo_states.get(i))
            tol = 4 * torch.finfo(dtype).eps * max(1.0, alone.abs().max().item())
            diff = (got - alone).abs().max().item()
            assert diff <= tol, f"layer {layer}, sequence {i} ({lens[i]} tokens): {diff:.3g} from its solo run"
            n = lens[i]
            if config.density >= 1.0 or n < DENSE_BELOW:  # dense: SDPA's causal attention
                ref_lp = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=hq != hkv)
                ref_hp = F.scaled_dot_product_attention(qs.double(), ks.double(), vs.double(), is_causal=True,
                                                        enable_gqa=hq != hkv)
                err, allowed = error_budget(got, ref_lp, ref_hp)
            else:
                _, oracle_states[i], sel = eager_sketchwalk_attention(qs, ks, vs, config, layer,
                                                                      oracle_states.get(i))
                err, allowed = reference_error_budget(qs, ks, vs, token_mask(n, selection=sel), got)
            assert err <= allowed, f"layer {layer}, sequence {i} ({n} tokens): {err:.3g} > {allowed:.3g}"
            worst = max(worst, err)
    return worst


@st.composite
def batches(draw):
    lens = draw(st.lists(st.integers(1, 300), min_size=1, max_size=4))
    if draw(st.booleans()):
        lens.insert(draw(st.integers(0, len(lens))), 0)  # an empty sequence (cu_seqlens repeats an entry)
    if draw(st.booleans()):
        lens[draw(st.integers(0, len(lens) - 1))] = draw(st.integers(1, DENSE_BELOW - 1))  # below dense_below
    hkv = draw(st.sampled_from([1, 2]))
    return dict(lens=lens, hkv=hkv, hq=hkv * draw(st.sampled_from([1, 2])),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                density=draw(st.sampled_from([0.2, 0.4, 1.0])),
                query_block=draw(st.sampled_from([None, None, 2 * BS])),
                seed=draw(st.integers(0, 2**16)))


def _config(case):
    return SketchWalkConfig(density=case["density"], dense_below=DENSE_BELOW, dense_layers=0, block_size=BS,
                            query_block_size=case["query_block"])


@settings(max_examples=25)
@given(case=batches())
def test_packed_flex_equals_solo_runs_the_oracle_and_sdpa(case):
    with torch.compiler.set_stance("force_eager"), flexwalk.options(prefill_kernel="flex"):
        check_batch(case["lens"], case["hq"], case["hkv"], case["dtype"], case["seed"], _config(case))


@settings(max_examples=6)
@given(case=batches())
def test_packed_triton_equals_solo_runs_the_oracle_and_sdpa(case):
    dtype = torch.float16 if case["dtype"] == torch.bfloat16 else case["dtype"]  # the interpreter has no bf16
    with flexwalk.options(prefill_kernel="triton"):
        check_batch(case["lens"], case["hq"], case["hkv"], dtype, case["seed"], _config(case), layers=1)


@pytest.mark.parametrize("kernel, dtype", [("flex", torch.float32), ("flex", torch.bfloat16),
                                           ("triton", torch.float32), ("triton", torch.float16)])
def test_max_errors_per_dtype(kernel, dtype):
    """A fixed mixed batch (two sequences below dense_below), two layers; prints the largest error
    against the oracle per kernel and dtype (Triton's interpreter has no bfloat16: float16)."""
    lens = [37, 300, 129, 16, 250]
    cfg = SketchWalkConfig(density=0.2, dense_below=DENSE_BELOW, dense_layers=0, block_size=BS)
    stance = torch.compiler.set_stance("force_eager") if kernel == "flex" else contextlib.nullcontext()
    with stance, flexwalk.options(prefill_kernel=kernel):
        err = check_batch(lens, 4, 2, dtype, 7, cfg)
    print(f"{kernel} {dtype}: max error against the oracle or SDPA {err:.3g}")


def test_one_triton_launch_per_batch():
    lens = [100, 30, 200]
    q, k, v = packed_inputs(lens, 4, 2, torch.float32, 1, 0)
    cfg = SketchWalkConfig(density=0.3, dense_below=DENSE_BELOW, dense_layers=0, block_size=BS)
    flexwalk.reset_counters()
    with flexwalk.options(prefill_kernel="triton"):
        sketchwalk_varlen_attention(q, k, v, cu_seqlens(lens), 200, cfg, 0)
    assert flexwalk.counters() == {"varlen_prefill": 1, "sparse_prefill": 2, "dense_short": 1, "triton_prefill": 1}


def test_triton_selection_reads_each_sequence_in_place():
    """The Triton selection (what runs on CUDA) reads each sequence as a strided view of the
    packed tensors; two layers equal the solo runs and the oracle."""
    cfg = SketchWalkConfig(density=0.3, dense_below=DENSE_BELOW, dense_layers=0, block_size=BS)
    flexwalk.reset_counters()
    with flexwalk.options(prefill_kernel="triton", triton_selection_on_cpu=True):
        check_batch([90, 20, 160], 4, 2, torch.float32, 4, cfg)
    assert flexwalk.counters()["triton_selection"] == 8  # two sparse sequences, packed and solo, two layers


def test_counters_and_density():
    lens = [100, 30, 200]
    cfg = SketchWalkConfig(density=0.3, dense_below=DENSE_BELOW, dense_layers=1, block_size=BS)
    q, k, v = packed_inputs(lens, 4, 2, torch.float32, 1, 0)
    flexwalk.reset_counters()
    with torch.compiler.set_stance("force_eager"), flexwalk.options(prefill_kernel="flex"):
        out, state = sketchwalk_varlen_attention(q, k, v, cu_seqlens(lens), 200, cfg, 0)
        assert flexwalk.counters() == {"varlen_prefill": 1, "dense_layer": 3}
        assert state.states == (None, None, None)
        flexwalk.reset_counters()
        out, state = sketchwalk_varlen_attention(q, k, v, cu_seqlens(lens), 200, cfg, 1, state)
    assert flexwalk.counters() == {"varlen_prefill": 1, "sparse_prefill": 2, "dense_short": 1}
    assert state.states[1] is None and state.states[0].seq_len == 100 and state.states[2].seq_len == 200
    assert 0.3 <= flexwalk.density_report()[1] < 1.0


def test_fa4_takes_the_aligned_batch(fake_fa4):  # noqa: F811
    """FA4 gets the block-aligned copy as a batch of one: causal, one list row per query block of
    the copy, and every sequence equals the oracle."""
    lens = [70, 25, 140]
    cfg = SketchWalkConfig(density=0.3, dense_below=DENSE_BELOW, dense_layers=0, block_size=BS, sketch_dim=16)
    CALLS.clear()
    flexwalk.reset_counters()
    check_batch(lens, 4, 2, torch.float16, 3, cfg)
    assert flexwalk.counters()["varlen_prefill"] == 2
    aligned = sum(-(-n // BS) * BS for n in lens)
    packed = [c for c in CALLS if c["n_q"] == aligned]  # the others are the solo runs
    assert len(packed) == 2 and all(c["causal"] and c["block_size"] == (BS, BS) for c in packed)


def test_window_dense_layers_and_residual_run_each_sequence_alone():
    lens = [90, 40, 120]
    q, k, v = packed_inputs(lens, 4, 2, torch.float32, 5, 0)
    cu = cu_seqlens(lens, torch.int64)
    base = SketchWalkConfig(density=0.3, dense_below=DENSE_BELOW, dense_layers=0, block_size=BS)
    with torch.compiler.set_stance("force_eager"):
        for cfg, kw in ((base, dict(window=24)), (base.replace(residual=True), {}), (base, dict(softcap=5.0))):
            out, _ = sketchwalk_varlen_attention(q, k, v, cu, None, cfg, 0, **kw)
            for i, rows in sequences(lens):
                alone, _ = flexwalk.sketchwalk_attention(solo(q, rows), solo(k, rows), solo(v, rows), cfg, 0, **kw)
                assert (out[rows].transpose(0, 1)[None] - alone).abs().max().item() <= 1e-5, (kw, i)


def test_compiled_flex_serves_a_bucket_with_one_kernel():
    """Compiled flex (as the library runs it): two batches of other lengths in one length bucket
    compile one kernel between them, and both equal their solo runs."""
    cfg = SketchWalkConfig(density=0.3, dense_below=DENSE_BELOW, dense_layers=0, block_size=BS)
    clear_flex_functions()
    with flexwalk.options(prefill_kernel="flex"):
        for lens in ([100, 40, 90], [70, 150]):  # both lay out in 256 rows
            before = len(flex_functions())
            check_batch(lens, 4, 2, torch.float32, 11, cfg, layers=1)
            sparse_fns = len(flex_functions()) - before
            if lens == [70, 150]:
                assert sparse_fns == 0, "a second batch of the same bucket compiled another flex kernel"


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([0, 5, 10], dtype=torch.float32), "cu_seqlens of type torch.float32 is invalid"),
    ([0, 5, 10], "cu_seqlens of type list is invalid"),
    (torch.tensor([[0, 10]], dtype=torch.int32), r"cu_seqlens of shape \(1, 2\) is invalid"),
    (torch.tensor([1, 5, 10], dtype=torch.int32), r"cu_seqlens\[0\]=1 is invalid: it must be 0"),
    (torch.tensor([0, 6, 5, 10], dtype=torch.int32), "must be non-decreasing"),
    (torch.tensor([0, 5, 9], dtype=torch.int64), r"cu_seqlens\[-1\]=9 is invalid: it must equal total_tokens=10"),
])
def test_bad_cu_seqlens_name_the_parameter(cu, message):
    q, k, v = packed_inputs([10], 4, 2, torch.float32, 0, 0)
    with pytest.raises(ValueError, match=message):
        sketchwalk_varlen_attention(q, k, v, cu, 10, SketchWalkConfig(), 0)


def test_bad_shapes_max_seqlen_and_state_name_the_parameter():
    q, k, v = packed_inputs([10, 20], 4, 2, torch.float32, 0, 0)
    cu = cu_seqlens([10, 20])
    cfg = SketchWalkConfig(dense_below=0, dense_layers=0, block_size=BS)
    with pytest.raises(ValueError, match=r"must be \[total_tokens, heads, head_dim\]"):
        sketchwalk_varlen_attention(q[None], k, v, cu, 20, cfg, 0)
    with pytest.raises(ValueError, match="must agree in total_tokens"):
        sketchwalk_varlen_attention(q[:-1], k, v, cu, 20, cfg, 0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sketchwalk_varlen_attention(q[:, :3], k, v, cu, 20, cfg, 0)
    with pytest.raises(ValueError, match=r"max_seqlen=12 is invalid: allowed None or an int >= the longest sequence \(20\)"):
        sketchwalk_varlen_attention(q, k, v, cu, 12, cfg, 0)
    with torch.compiler.set_stance("force_eager"), flexwalk.options(prefill_kernel="flex"):
        _, state = sketchwalk_varlen_attention(q, k, v, cu, 20, cfg, 0)
        with pytest.raises(ValueError, match=r"built for sequence lengths \[10, 20\]; this layer has \[20, 10\]"):
            sketchwalk_varlen_attention(q, k, v, cu_seqlens([20, 10]), 20, cfg, 1, state)
    with pytest.raises(ValueError, match="state of type WalkState is invalid"):
        sketchwalk_varlen_attention(q, k, v, cu, 20, cfg, 1, state.states[0])


def _tp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_grad_enabled(False)
        result = _tp_run(dist.group.WORLD, rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


TP_LENS = [90, 30, 150]


def _tp_run(group=None, rank=0, world=1):
    """Two sparse layers of the packed batch on this rank's share of the heads."""
    cfg = SketchWalkConfig(density=0.3, dense_below=DENSE_BELOW, dense_layers=0, block_size=BS)
    state, outs = None, []
    with torch.compiler.set_stance("force_eager"), flexwalk.options(prefill_kernel="flex"):
        for layer in range(2):
            q, k, v = packed_inputs(TP_LENS, 4, 2, torch.float32, 9, layer)
            hq, hkv = 4 // world, 2 // world
            q, k, v = q[:, rank * hq:(rank + 1) * hq], k[:, rank * hkv:(rank + 1) * hkv], v[:, rank * hkv:(rank + 1) * hkv]
            out, state = sketchwalk_varlen_attention(q, k, v, cu_seqlens(TP_LENS), None, cfg, layer, state,
                                                     process_group=group)
            outs.append(out)
    return outs


def test_two_gloo_ranks_match_one_process(tmp_path):
    """Tensor parallelism: each rank holds half the heads and selects with the head means
    all-reduced; the ranks' outputs, heads put back together, equal one process's."""
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for layer, ref in enumerate(_tp_run()):
        out = torch.cat([ranks[0][layer], ranks[1][layer]], dim=1)
        assert (out - ref).abs().max().item() <= 1e-5, f"layer {layer}"
