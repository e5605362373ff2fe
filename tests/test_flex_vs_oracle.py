"""The compiled flex path computes exactly what the eager oracle defines."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexwalk
from conftest import assert_matches_reference, left_padding, random_qkv
from flexwalk import SketchWalkConfig, dense_attention, eager_sketchwalk_attention, sketchwalk_attention, token_mask


def sparse_cfg(**kw):
    base = dict(dense_layers=0, dense_below=0, sketch_dim=16)
    base.update(kw)
    return SketchWalkConfig(**base)


@given(
    n=st.integers(33, 333),
    bs=st.sampled_from([16, 32, 64]),
    hkv=st.sampled_from([1, 2, 3]),
    g=st.sampled_from([1, 2, 3]),
    batch=st.sampled_from([1, 2]),
    density=st.floats(0.05, 1.0),
    walk=st.sampled_from(["walk", "damped", "one_hop"]),
    pad=st.integers(0, 100),
    seed=st.integers(0, 10_000),
)
def test_flex_equals_oracle(n, bs, hkv, g, batch, density, walk, pad, seed):
    flexwalk.reset_counters()
    pad = min(pad, n - 1) if batch == 2 else 0
    cfg = sparse_cfg(block_size=bs, density=density, walk=walk, dense_tail_blocks=seed % 2)
    q, k, v = random_qkv(batch, hkv * g, hkv, n, 16, seed=seed)
    kv = left_padding(batch, n, [0, pad][:batch]) if pad else None
    st_f = st_o = None
    for layer in range(2):
        out, st_f = sketchwalk_attention(q, k, v, cfg, layer, st_f, key_valid=kv)
        ref, st_o, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, st_o, key_valid=kv)
        assert torch.isfinite(out).all()
        mask = token_mask(n, selection=sel, key_valid=kv)
        real = slice(None) if kv is None else kv[-1]
        # compare real query rows (padding rows attend to themselves only)
        assert_matches_reference(q[..., real, :], k, v, mask[..., real, :], out[..., real, :])
        assert torch.equal(st_f.transition, st_o.transition)
    assert flexwalk.counters()["sparse_prefill"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_budget_equals_dense_sdpa(dtype):
    q, k, v = random_qkv(2, 6, 2, 301, 32, dtype=dtype, seed=4)
    cfg = sparse_cfg(block_size=32, density=1.0)
    out, _ = sketchwalk_attention(q, k, v, cfg, 0)
    assert out.dtype == dtype
    mask = token_mask(301, batch=2)
    assert_matches_reference(q, k, v, mask, out)
    assert flexwalk.counters() == {"sparse_prefill": 1}


def test_sparse_budget_really_differs_from_dense():
    q, k, v = random_qkv(1, 4, 4, 512, 32, seed=5)
    out, _ = sketchwalk_attention(q, k, v, sparse_cfg(block_size=32, density=0.2), 0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - dense).abs().max() > 1e-2
    assert flexwalk.density_report()[0] < 0.5


def test_softcap_and_scale_follow_the_oracle():
    q, k, v = random_qkv(1, 4, 2, 200, 16, seed=6)
    cfg = sparse_cfg(block_size=16, density=0.4)
    out, _ = sketchwalk_attention(q * 4, k * 4, v, cfg, 0, softcap=5.0, scale=0.3)
    ref, _, sel = eager_sketchwalk_attention(q * 4, k * 4, v, cfg, 0, softcap=5.0, scale=0.3)
    assert_matches_reference(q * 4, k * 4, v, token_mask(200, selection=sel), out, scale=0.3, softcap=5.0)


@given(n=st.integers(20, 300), window=st.integers(1, 120), pad=st.integers(0, 50), offset=st.integers(0, 90))
def test_dense_window_padding_and_offset_masks(n, window, pad, offset):
    """dense_attention (sliding windows, padding, queries after a cached prefix) vs token masks."""
    L = max(1, n - offset)
    pad = min(pad, n - 1)
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=n * 7 + window)
    q = q[:, :, n - L :]
    kv = left_padding(2, n, [0, pad])
    out = dense_attention(q, k, v, key_valid=kv, window=window, q_offset=n - L, block_size=32)
    full = token_mask(n, batch=2, key_valid=kv, window=window)
    mask = full[:, :, n - L :]
    rows = kv[1, n - L :]
    assert_matches_reference(q[..., rows, :], k, v, mask[..., rows, :], out[..., rows, :])


def test_functional_api_routes_dense_paths_observably():
    q, k, v = random_qkv(1, 2, 2, 100, 16)
    cfg = SketchWalkConfig(dense_layers=1, dense_below=64, block_size=16)
    sketchwalk_attention(q, k, v, cfg, 0)
    sketchwalk_attention(q, k, v, cfg, 1)
    sketchwalk_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], cfg, 1)
    sketchwalk_attention(q, k, v, cfg, 2, window=20)
    assert flexwalk.counters() == {"dense_layer": 1, "sparse_prefill": 1, "dense_short": 1, "sliding_window": 1}


def test_bad_inputs_name_the_problem():
    q, k, v = random_qkv(1, 4, 2, 64, 16)
    cfg = sparse_cfg(block_size=16)
    with pytest.raises(ValueError, match=r"multiple of key/value heads"):
        sketchwalk_attention(q[:, :3], k, v, cfg, 0)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        sketchwalk_attention(q[0], k, v, cfg, 0)
    with pytest.raises(ValueError, match=r"layer_idx=-1"):
        sketchwalk_attention(q, k, v, cfg, -1)
    with pytest.raises(ValueError, match=r"key_valid must be"):
        sketchwalk_attention(q, k, v, cfg, 0, key_valid=torch.ones(1, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q has 32 tokens but k has 64"):
        sketchwalk_attention(q[:, :, :32], k, v, cfg, 0)
    with pytest.raises(TypeError, match="SketchWalkConfig"):
        sketchwalk_attention(q, k, v, {"density": 0.2}, 0)


def test_cpu_backward_is_refused_with_a_clear_error():
    q, k, v = random_qkv(1, 2, 2, 100, 16)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backward"):
        sketchwalk_attention(q, k, v, sparse_cfg(block_size=16), 0)
    with torch.no_grad():
        assert torch.isfinite(sketchwalk_attention(q, k, v, sparse_cfg(block_size=16), 0)[0]).all()
