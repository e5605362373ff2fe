"""The Triton block-sparse prefill kernel against the eager oracle (SDPA under the selection
expanded to a token mask).  On CPU the kernel runs through triton's interpreter (conftest), in
float32 and float16 (the interpreter computes in NumPy, which has no bfloat16: bf16 is checked on
the GPU, tests/gpu/test_gpu_prefill.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexwalk
from conftest import assert_matches_reference, left_padding, random_qkv
from flexwalk import SketchWalkConfig, eager_sketchwalk_attention, sketchwalk_attention, token_mask
from flexwalk.kernels import triton_prefill as TP

pytestmark = pytest.mark.skipif(not TP.HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def triton_kernel():
    with flexwalk.options(prefill_kernel="triton"):
        yield


@settings(max_examples=12)
@given(
    n=st.integers(20, 260),
    bs=st.sampled_from([16, 32]),
    m=st.sampled_from([1, 2, 4]),
    hkv=st.sampled_from([1, 2]),
    g=st.sampled_from([1, 3]),
    batch=st.sampled_from([1, 2]),
    density=st.floats(0.05, 1.0),
    pad=st.integers(0, 80),
    d=st.sampled_from([16, 32]),
    half=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_triton_prefill_equals_oracle(n, bs, m, hkv, g, batch, density, pad, d, half, seed):
    """Two layers (walk carried) through the Triton kernel against the oracle's token mask of the
    same selection: any block and query-block size, GQA, left padding (padding rows attend to
    themselves), dense tails of 0-2 blocks, float32 and float16."""
    with flexwalk.options(prefill_kernel="triton"):
        _triton_against_the_oracle(n, bs, m, hkv, g, batch, density, pad, d, half, seed)


def _triton_against_the_oracle(n, bs, m, hkv, g, batch, density, pad, d, half, seed):
    cfg = SketchWalkConfig(block_size=bs, query_block_size=bs * m if m > 1 else None, density=density, dense_layers=0,
                           dense_below=0, sketch_dim=16, dense_tail_blocks=seed % 3)
    pad = min(pad, n - 1) if batch == 2 else 0
    q, k, v = random_qkv(batch, hkv * g, hkv, n, d, dtype=torch.float16 if half else torch.float32, seed=seed)
    kv = left_padding(batch, n, [0, pad][:batch]) if pad else None
    flexwalk.reset_counters()
    st_t = st_o = None
    for layer in range(2):
        out, st_t = sketchwalk_attention(q, k, v, cfg, layer, st_t, key_valid=kv)
        _, st_o, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, st_o, key_valid=kv)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all()
        assert_matches_reference(q, k, v, token_mask(n, selection=sel, key_valid=kv), out)
        assert torch.equal(st_t.transition, st_o.transition)
    assert flexwalk.counters()["triton_prefill"] == 2
    assert flexwalk.counters()["sparse_prefill"] == 2


def _random_lists(g, batch, nq, nk, q_block, kv_block, n):
    """Random unique key block lists per query block, in random order: partial lists hold the
    blocks that overlap the query block (and any others), full lists blocks strictly below it."""
    f_num = torch.zeros(batch, nq, dtype=torch.int32)
    p_num = torch.zeros(batch, nq, dtype=torch.int32)
    f_idx = torch.zeros(batch, nq, nk, dtype=torch.int32)
    p_idx = torch.zeros(batch, nq, nk, dtype=torch.int32)
    table = torch.zeros(batch, nq, nk, dtype=torch.bool)
    for b in range(batch):
        for i in range(nq):
            lo = min(i * q_block // kv_block, nk)  # first key block the query block overlaps
            hi = min(-(-(i + 1) * q_block // kv_block), nk)
            below = torch.randperm(lo, generator=g)[: int(torch.randint(0, lo + 1, (1,), generator=g))]
            diag = torch.arange(lo, hi)[torch.randperm(hi - lo, generator=g)]
            f_num[b, i], p_num[b, i] = len(below), len(diag)
            f_idx[b, i, : len(below)] = below.to(torch.int32)
            p_idx[b, i, : len(diag)] = diag.to(torch.int32)
            table[b, i, below] = True
            table[b, i, diag] = True
    return f_num, f_idx, p_num, p_idx, table


@pytest.mark.parametrize("q_block,kv_block,block_n", [(32, 32, None), (32, 32, 16), (64, 16, None), (256, 64, 32)])
@pytest.mark.parametrize("reverse", [True, False])
def test_kernel_on_random_block_lists(q_block, kv_block, block_n, reverse):
    """The kernel alone on random unique block lists in random order (not the selection's):
    tiles smaller than a key block (block_n), query blocks of several key blocks, query blocks of
    more rows than a program's tile (256 rows: two programs per list), both launch orders; the
    lengths are off the block grid, so the last key block is partly past the end."""
    g = torch.Generator().manual_seed(q_block + kv_block)
    batch, hq, hkv, n, d = 2, 4, 2, 300, 16
    nq, nk = -(-n // q_block), -(-n // kv_block)
    q, k, v = random_qkv(batch, hq, hkv, n, d, seed=q_block)
    f_num, f_idx, p_num, p_idx, table = _random_lists(g, batch, nq + 1, nk + 1, q_block, kv_block, n)  # + bucket rows
    start = torch.zeros(batch, dtype=torch.int32)
    end = torch.full((batch,), n, dtype=torch.int32)
    out = TP.sparse_prefill_attention(q, k, v, f_num, f_idx, p_num, p_idx, start, end, q_block=q_block,
                                      kv_block=kv_block, block_n=block_n, reverse=reverse)
    pos = torch.arange(n)
    mask = table[:, pos // q_block][:, :, pos // kv_block] & (pos[None, :] <= pos[:, None])
    assert_matches_reference(q, k, v, mask[:, None], out)
    # [B, Hq, n, D] view of a [B, n, Hq, D] tensor: transformers' layout without a copy
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()


def test_kernel_reads_strided_inputs_as_transformers_passes_them():
    """q, k, v as transformers hands them over ([B, n, H, D] memory viewed as [B, H, n, D]) give the
    same output as contiguous copies, and 4-dim BlockMask-shaped tables ([B, 1, nq(, W)]) work."""
    q, k, v = random_qkv(1, 6, 2, 200, 32, seed=3)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    g = torch.Generator().manual_seed(0)
    f_num, f_idx, p_num, p_idx, _ = _random_lists(g, 1, 7, 7, 32, 32, 200)
    bounds = torch.zeros(1, dtype=torch.int32), torch.full((1,), 200, dtype=torch.int32)
    a = TP.sparse_prefill_attention(q, k, v, f_num, f_idx, p_num, p_idx, *bounds, q_block=32, kv_block=32)
    b = TP.sparse_prefill_attention(qs, ks, vs, f_num[:, None], f_idx[:, None], p_num[:, None], p_idx[:, None],
                                    *bounds, q_block=32, kv_block=32)
    assert torch.equal(a, b)


def test_sketch_path_equals_oracle(triton_kernel):
    """The path that keeps the layer's sketch (prefill before sparse decode, tensor parallelism)
    hands the kernel a BlockMask and the rows' key bounds (block_mask_attention): against the
    oracle with left padding and a length off the block grid."""
    from flexwalk.selection.sketch import layer_sketch

    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_layers=0, dense_below=0, sketch_dim=16)
    q, k, v = random_qkv(2, 4, 2, 233, 16, seed=12)
    kv = left_padding(2, 233, [0, 50])
    out, _ = sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv, sketch=layer_sketch(q, k, cfg, 0, key_valid=kv))
    _, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
    assert_matches_reference(q, k, v, token_mask(233, selection=sel, key_valid=kv), out)
    assert flexwalk.counters()["triton_prefill"] == 1 and "residual" not in flexwalk.counters()


def test_padding_rows_attend_to_themselves(triton_kernel):
    """A left-padding query sees only its own key (flex's mask_mod and the oracle agree), so its
    output is its own value row; real rows never see padding keys."""
    cfg = SketchWalkConfig(block_size=16, density=0.3, dense_layers=0, dense_below=0, sketch_dim=16)
    q, k, v = random_qkv(2, 2, 1, 100, 16, seed=5)
    kv = left_padding(2, 100, [0, 37])
    out, _ = sketchwalk_attention(q, k, v, cfg, 0, None, key_valid=kv)
    torch.testing.assert_close(out[1, :, :37], v[1, :, :37].expand(2, -1, -1), atol=1e-6, rtol=0)
    v2 = v.clone()
    v2[1, :, :37] += 100.0  # padding values change: real rows must not move
    out2, _ = sketchwalk_attention(q, k, v2, cfg, 0, None, key_valid=kv)
    assert torch.equal(out[:, :, 37:], out2[:, :, 37:])


def test_the_kernel_setting_picks_the_path():
    """"auto" runs flex on CPU and "triton" the Triton kernel (the interpreter); soft-capping and
    tensors that need grad always run flex; "flex" never runs triton."""
    from flexwalk.prefill import prefill_kernel

    cfg = SketchWalkConfig(block_size=16, density=0.3, dense_layers=0, dense_below=0, sketch_dim=16)
    q, k, v = random_qkv(1, 2, 1, 64, 16, seed=1)
    for kernel, softcap, grad, expect in (("auto", None, False, False), ("triton", None, False, True),
                                          ("triton", 5.0, False, False), ("triton", None, True, False),
                                          ("flex", None, False, False)):
        qq = q.clone().requires_grad_(grad)
        with flexwalk.options(prefill_kernel=kernel):
            assert (prefill_kernel(qq, k, v, cfg, softcap) == "triton") is expect, (kernel, softcap, grad)
    flexwalk.reset_counters()
    with flexwalk.options(prefill_kernel="triton"):
        out, _ = sketchwalk_attention(q, k, v, cfg, 0, None, softcap=5.0)
    assert "triton_prefill" not in flexwalk.counters() and flexwalk.counters()["sparse_prefill"] == 1
    assert torch.isfinite(out).all()


def test_auto_uses_triton_only_for_the_measured_shapes():
    """The "auto" policy's shapes (head dim, query block, key block) are the ones the H100 runs
    measured faster than flex (docs/benchmarks.md, "The attention kernels"); other shapes keep flex."""
    from flexwalk.prefill import TRITON_AUTO_SHAPES

    assert TRITON_AUTO_SHAPES == {(128, 128, 128)}


def test_unsupported_shapes_raise_with_the_values():
    q, k, v = random_qkv(1, 2, 1, 32, 24, seed=0)
    z = torch.zeros(1, 1, dtype=torch.int32)
    zi = torch.zeros(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim=24"):
        TP.sparse_prefill_attention(q, k, v, z, zi, z, zi, z[0], z[0] + 32, q_block=32, kv_block=32)
    q, k, v = random_qkv(1, 3, 2, 32, 16, seed=0)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        TP.sparse_prefill_attention(q, k, v, z, zi, z, zi, z[0], z[0] + 32, q_block=32, kv_block=32)
    assert not TP.supported(q, q_block=32, kv_block=32, softcap=5.0)
    assert not TP.supported(q, q_block=32, kv_block=32, window=16)
    assert not TP.supported(q, q_block=16, kv_block=32)
    assert not TP.supported(q, q_block=48, kv_block=16)
