"""The split-KV Triton decode kernel against the eager oracle (SDPA under the selection
expanded to a token mask).  On CPU the kernel runs through triton's interpreter (conftest)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_matches_reference
from flexwalk.kernels.triton_decode import num_splits, sparse_decode_attention, tiling

cases = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "hkv": st.integers(1, 2),
        "g": st.sampled_from([1, 3, 4, 5]),
        "d": st.sampled_from([16, 32]),
        "bs": st.sampled_from([16, 32]),
        "s": st.integers(1, 150),
        "density": st.floats(0.0, 1.0),
        "splits": st.integers(1, 5),
        "sub_tile": st.sampled_from([None, 16]),  # blocks read in 16-key tiles (large head dims)
        "softcap": st.sampled_from([None, 5.0]),
        # triton's interpreter computes in NumPy, which has no bfloat16: bf16 is checked on the GPU
        # (tests/gpu/test_gpu_decode.py)
        "dtype": st.sampled_from([torch.float32, torch.float16]),
        "seed": st.integers(0, 2**16),
    }
)


def random_selection(g: torch.Generator, batch: int, s: int, bs: int, density: float):
    """kv_num [B], kv_idx [B, C] (a random subset of the blocks, first kv_num valid, in random
    order; the rest a permutation of the remaining blocks), start [B], end."""
    c = -(-s // bs)
    num, idx, start = [], [], []
    end = int(torch.randint(1, s + 1, (1,), generator=g))
    for _ in range(batch):
        perm = torch.randperm(c, generator=g)
        num.append(int(round(density * c)))
        idx.append(perm)
        start.append(int(torch.randint(0, end, (1,), generator=g)))
    return (torch.tensor(num, dtype=torch.int32), torch.stack(idx).to(torch.int32),
            torch.tensor(start, dtype=torch.int32), torch.tensor(end, dtype=torch.int32))


def token_mask(kv_num, kv_idx, start, end, s, bs):
    """[B, 1, 1, S] bool: keys of the selected blocks inside [start, end)."""
    bsz = kv_idx.shape[0]
    m = torch.zeros(bsz, s, dtype=torch.bool)
    for b in range(bsz):
        for j in kv_idx[b, : int(kv_num[b])].tolist():
            m[b, j * bs : (j + 1) * bs] = True
    t = torch.arange(s)
    m &= (t >= start[:, None]) & (t < end)
    return m[:, None, None, :]


@given(case=cases)
def test_kernel_matches_oracle(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, hkv, d, s, bs = case["batch"], case["hkv"], case["d"], case["s"], case["bs"]
    hq = hkv * case["g"]
    q = torch.randn(b, hq, 1, d, generator=g).to(case["dtype"])
    k = torch.randn(b, hkv, s, d, generator=g).to(case["dtype"])
    v = torch.randn(b, hkv, s, d, generator=g).to(case["dtype"])
    kv_num, kv_idx, start, end = random_selection(g, b, s, bs, case["density"])
    out = sparse_decode_attention(q, k, v, kv_num, kv_idx, start, end, block_size=bs, softcap=case["softcap"],
                                  splits=case["splits"], sub_tile=case["sub_tile"])
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = token_mask(kv_num, kv_idx, start, end, s, bs)
    empty = ~mask.any(-1).reshape(b)
    if empty.any():  # a row with no key reads 0, as flex's does
        assert out[empty].eq(0).all()
    if (~empty).any():
        keep = ~empty
        assert_matches_reference(q[keep], k[keep], v[keep], mask[keep], out[keep], softcap=case["softcap"])


def test_strided_cache_and_per_row_end():
    """A cache viewed out of a larger buffer (transformers' static caches are plain tensors, but
    sliced views must work too) and one end per row."""
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(2, 3, 2, 96, 32, generator=g)
    k, v = buf[:, :, 0], buf[:, :, 1]  # non-contiguous [B, H, S, D]
    q = torch.randn(2, 6, 1, 32, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
    kv_num = torch.tensor([2, 3], dtype=torch.int32)
    kv_idx = torch.tensor([[5, 0, 1, 2, 3, 4], [1, 4, 2, 0, 3, 5]], dtype=torch.int32)
    start = torch.tensor([0, 7], dtype=torch.int32)
    end = torch.tensor([90, 70], dtype=torch.int32)
    out = sparse_decode_attention(q, k, v, kv_num, kv_idx, start, end, block_size=16, splits=2)
    mask = torch.cat([token_mask(kv_num[i : i + 1], kv_idx[i : i + 1], start[i : i + 1], end[i], 96, 16)
                      for i in range(2)])
    assert_matches_reference(q, k, v, mask, out)


def test_tiles_fit_shared_memory():
    cpu = torch.device("cpu")  # the CPU budget stands for an H100's 228 KiB
    assert tiling(128, 128, 2, cpu) == (128, 3)  # the measured best at Llama's shape
    sub, stages = tiling(128, 256, 4, cpu)  # fp32, head dim 256: tiles split, fewer stages
    assert sub < 128 and 2 * sub * 256 * 4 * stages <= 212 * 1024 and stages >= 1


def test_splits_depend_on_static_shapes_only():
    cpu = torch.device("cpu")
    assert num_splits(1, 8, 1024, cpu) == num_splits(1, 8, 1024, cpu)
    assert 1 <= num_splits(64, 8, 3, cpu) <= 3
    assert num_splits(1, 1, 1000, cpu) <= 64


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 4, 2, 16)
    k = v = torch.randn(1, 2, 32, 16)
    sel = (torch.tensor([1], dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32),
           torch.zeros(1, dtype=torch.int32), torch.tensor(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="query positions"):
        sparse_decode_attention(q, k, v, *sel, block_size=16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_decode_attention(torch.randn(1, 3, 1, 16), k, v, *sel, block_size=16)
    with pytest.raises(ValueError, match="block_size=24"):
        sparse_decode_attention(torch.randn(1, 4, 1, 16), k, v, *sel, block_size=24)
