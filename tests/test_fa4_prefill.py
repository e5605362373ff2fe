"""flexwalk.kernels.fa4: the hand-over of a selection to FlashAttention 4 (`flash_attn.cute`).

FA4 needs a Hopper GPU, so here a stand-in module takes its place.  `fake_fa4` implements FA4's
block-sparse semantics (flash_attn/cute/block_sparsity.py, flash_fwd_sm90.py, 4.0.0b36): per query
tile of block_size[0] rows, the "mask" blocks get the causal mask (causal=True) and the sequence
end, the "full" blocks no mask at all; entries past each count are ignored; batch and head dims
of size 1 broadcast; indices may be compact (fewer columns than key blocks).  It computes that
on a dense mask through SDPA and checks the call's contract: int32 lists with exactly
ceil(n / block_size[0]) rows, q / k / v in FA4's [B, n, H, D] layout with a contiguous head dim,
and the block size.  The real kernel ran on an H100 against flexwalk's Triton kernel
(equal to bf16 rounding); tests/gpu/test_gpu_prefill.py checks it against the oracle on the GPU.
"""

from __future__ import annotations

import importlib.machinery
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexwalk
from conftest import assert_matches_reference, left_padding, random_qkv
from flexwalk import SketchWalkConfig, eager_sketchwalk_attention, sketchwalk_attention, token_mask
from flexwalk.kernels import fa4 as FA4
from flexwalk.selection.sketch import layer_sketch


class BlockSparseTensorsTorch(NamedTuple):  # the fields of flash_attn.cute.block_sparsity's, in order
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None


CALLS: list[dict] = []


def _fa4_mask(lists: BlockSparseTensorsTorch, batch: int, heads: int, n_q: int, n_k: int, causal: bool,
              mask_mod=None):
    """[B, H, n_q, n_k] bool: what FA4 computes for these lists (see the module docstring); a
    mask_mod (FA4's signature) applies on mask blocks, in place of the causal mask."""
    assert not (causal and mask_mod is not None), "FA4 drops causal=True when a mask_mod is given"
    bq, bk = lists.block_size
    m_rows = -(-n_q // bq)
    mask = torch.zeros(batch, heads, n_q, n_k, dtype=torch.bool)
    pos_q, pos_k = torch.arange(n_q), torch.arange(n_k)
    for cnt, idx, masked in ((lists.mask_block_cnt, lists.mask_block_idx, True),
                             (lists.full_block_cnt, lists.full_block_idx, False)):
        if cnt is None:
            continue
        assert cnt.dtype == idx.dtype == torch.int32
        assert cnt.dim() == 3 and idx.dim() == 4 and cnt.shape[2] == idx.shape[2] == m_rows, (cnt.shape, idx.shape)
        assert idx.shape[3] <= -(-n_k // bk), "more index columns than key blocks"
        cnt = cnt.expand(batch, heads, m_rows)
        idx = idx.expand(batch, heads, m_rows, idx.shape[3])
        for b in range(batch):
            for h in range(heads):
                for i in range(m_rows):
                    rows = slice(i * bq, min((i + 1) * bq, n_q))
                    for j in idx[b, h, i, : int(cnt[b, h, i])].tolist():
                        cols = pos_k[j * bk: min((j + 1) * bk, n_k)]
                        allowed = torch.ones(rows.stop - rows.start, len(cols), dtype=torch.bool)
                        if masked and causal:
                            allowed &= cols[None, :] <= pos_q[rows][:, None] + (n_k - n_q)
                        if masked and mask_mod is not None:
                            allowed &= mask_mod(b, h, pos_q[rows][:, None], cols[None, :], None, None)
                        mask[b, h, rows, j * bk: j * bk + len(cols)] |= allowed
    return mask


def fake_flash_attn_func(q, k, v, softmax_scale=None, causal=False, block_sparse_tensors=None, mask_mod=None, **kw):
    assert not kw, f"unexpected arguments {sorted(kw)}"
    for t in (q, k, v):
        assert t.stride(-1) == 1, "FA4 needs a contiguous head dim"
    batch, n_q, hq, d = q.shape
    n_k, hkv = k.shape[1], k.shape[2]
    assert v.shape == k.shape and hq % hkv == 0
    lists = block_sparse_tensors
    assert lists is not None and lists.block_size is not None
    CALLS.append(dict(causal=causal, mask_mod=mask_mod is not None, block_size=lists.block_size, n_q=n_q))
    mask = _fa4_mask(lists, batch, hq, n_q, n_k, causal, mask_mod)
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(d)
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    kf, vf = kf.repeat_interleave(hq // hkv, 1), vf.repeat_interleave(hq // hkv, 1)
    s = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no key: FA4 writes zeros
    out = (p @ vf).to(q.dtype).transpose(1, 2).contiguous()
    return out, torch.logsumexp(s, -1)


@pytest.fixture
def fake_fa4(monkeypatch):
    """flash_attn.cute stand-in, FA4 taken as supported on the CPU for the shapes the tests use."""
    pkg = types.ModuleType("flash_attn")
    pkg.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.__spec__ = importlib.machinery.ModuleSpec("flash_attn.cute", None)
    cute.flash_attn_func = fake_flash_attn_func
    bsp = types.ModuleType("flash_attn.cute.block_sparsity")
    bsp.BlockSparseTensorsTorch = BlockSparseTensorsTorch
    for name, mod in (("flash_attn", pkg), ("flash_attn.cute", cute), ("flash_attn.cute.block_sparsity", bsp)):
        monkeypatch.setitem(sys.modules, name, mod)
    FA4.available.cache_clear()
    CALLS.clear()
    with flexwalk.options(fa4_on_cpu=True, fa4_shapes=FAKE_SHAPES, prefill_kernel="fa4"):
        yield
    FA4.available.cache_clear()


FAKE_SHAPES = {(d, b, b) for d in (16, 32) for b in (16, 32)} | {(32, 64, 32)}


def _config(bs, density, tail, m=1, **kw):
    return SketchWalkConfig(block_size=bs, query_block_size=bs * m if m > 1 else None, density=density,
                            dense_layers=0, dense_below=0, sketch_dim=16, dense_tail_blocks=tail, **kw)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(20, 200),
    bs=st.sampled_from([16, 32]),
    hkv=st.sampled_from([1, 2]),
    g=st.sampled_from([1, 3]),
    batch=st.sampled_from([1, 2]),
    density=st.floats(0.05, 1.0),
    d=st.sampled_from([16, 32]),
    seed=st.integers(0, 10_000),
)
def test_fa4_path_equals_the_oracle(fake_fa4, n, bs, hkv, g, batch, density, d, seed):
    """Two layers (walk carried) through the FA4 hand-over against the oracle's token mask of the
    same selection: off-grid lengths, GQA, batches, dense tails of 0-2 blocks, fp16.  Every call
    is causal with the config's block size and ceil(n / block) rows, and the output is a
    [B, Hq, n, D] view of a [B, n, Hq, D] tensor (transformers' layout, no copy)."""
    cfg = _config(bs, density, seed % 3)
    q, k, v = random_qkv(batch, hkv * g, hkv, n, d, dtype=torch.float16, seed=seed)
    CALLS.clear()
    flexwalk.reset_counters()
    st_f = st_o = None
    for layer in range(2):
        out, st_f = sketchwalk_attention(q, k, v, cfg, layer, st_f)
        _, st_o, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, st_o)
        assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
        assert out.transpose(1, 2).is_contiguous()
        assert_matches_reference(q, k, v, token_mask(n, selection=sel), out)
    assert flexwalk.counters()["fa4_prefill"] == 2 and flexwalk.counters()["sparse_prefill"] == 2
    assert all(c["causal"] and c["block_size"] == (bs, bs) and c["n_q"] == n for c in CALLS) and len(CALLS) == 2


def test_fa4_path_with_a_mask_function_instead_of_causal(fake_fa4, monkeypatch):
    """MASK="mask_mod": causal=False and FA4 applies the mask function (kv <= q) to the partial
    blocks only; the output still equals the oracle's.  (The real function is CuTe code: here a
    torch one with FA4's signature stands in.)"""
    cutlass = types.ModuleType("cutlass")
    cute = types.ModuleType("cutlass.cute")
    cute.jit = lambda fn: fn  # the CuTe function, run as torch code
    cutlass.cute = cute
    monkeypatch.setitem(sys.modules, "cutlass", cutlass)
    monkeypatch.setitem(sys.modules, "cutlass.cute", cute)
    FA4.causal_mask_mod.cache_clear()
    try:
        with flexwalk.options(fa4_mask="mask_mod"):
            _fa4_path_with_a_mask_function()
    finally:
        FA4.causal_mask_mod.cache_clear()
    with pytest.raises(ValueError, match=r"flexwalk option fa4_mask='tril' is invalid: allowed causal, mask_mod"):
        flexwalk.options(fa4_mask="tril").__enter__()


def _fa4_path_with_a_mask_function():
    cfg = _config(16, 0.3, 1)
    q, k, v = random_qkv(2, 4, 2, 170, 32, dtype=torch.float16, seed=11)
    out, _ = sketchwalk_attention(q, k, v, cfg, 0, None)
    _, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0, None)
    assert_matches_reference(q, k, v, token_mask(170, selection=sel), out)
    assert CALLS[-1]["causal"] is False and CALLS[-1]["mask_mod"] is True


def test_fa4_path_with_a_kernel_query_block_of_two_key_blocks(fake_fa4):
    """query_block_size = 2 x block_size: FA4's query tile is the kernel's query block, and its
    two diagonal key blocks are both mask blocks."""
    cfg = _config(32, 0.3, 1, m=2)
    q, k, v = random_qkv(1, 4, 2, 300, 32, dtype=torch.float16, seed=5)
    out, _ = sketchwalk_attention(q, k, v, cfg, 0, None)
    _, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0, None)
    assert_matches_reference(q, k, v, token_mask(300, selection=sel), out)
    assert CALLS[-1]["block_size"] == (64, 32) and flexwalk.counters()["fa4_prefill"] == 1


def test_fa4_path_from_a_block_mask_the_decode_state_shares(fake_fa4):
    """With a decode state to build (the sketch path: a BlockMask instead of the fused tables),
    the BlockMask's lists go to FA4 and give the same output as the tables."""
    cfg = _config(16, 0.25, 1)
    q, k, v = random_qkv(2, 6, 2, 150, 16, dtype=torch.float16, seed=9)
    sk = layer_sketch(q, k, cfg, 0)
    out_bm, _ = sketchwalk_attention(q, k, v, cfg, 0, None, sketch=sk)
    out_t, _ = sketchwalk_attention(q, k, v, cfg, 0, None)
    assert flexwalk.counters()["fa4_prefill"] == 2
    torch.testing.assert_close(out_bm, out_t, rtol=0, atol=0)


def test_the_stand_in_tells_mask_blocks_from_full_ones(fake_fa4):
    """The check above could fail: a diagonal block listed as full attends to future keys."""
    n, bs = 64, 16
    q, k, v = (t.transpose(1, 2) for t in random_qkv(1, 2, 2, n, 16, dtype=torch.float16, seed=1))
    nq = n // bs
    diag = torch.arange(nq, dtype=torch.int32).view(1, 1, nq, 1)
    one = torch.ones(1, 1, nq, dtype=torch.int32)
    zero = torch.zeros(1, 1, nq, dtype=torch.int32)
    as_mask = BlockSparseTensorsTorch(one, diag, zero, diag, block_size=(bs, bs))
    as_full = BlockSparseTensorsTorch(zero, diag, one, diag, block_size=(bs, bs))
    a = fake_flash_attn_func(q, k, v, causal=True, block_sparse_tensors=as_mask)[0]
    b = fake_flash_attn_func(q, k, v, causal=True, block_sparse_tensors=as_full)[0]
    assert (a - b).abs().max() > 0.1


def test_block_sparse_lists_drop_bucket_rows_and_keep_one_head():
    """Tables of a length bucket (more rows than n needs) and BlockMask-shaped ones give the
    same [B, 1, ceil(n / q_block)] int32 lists; too few rows raise ValueError."""
    g = torch.Generator().manual_seed(0)
    cnt = torch.randint(0, 3, (2, 7), generator=g, dtype=torch.int32)
    idx = torch.randint(0, 7, (2, 7, 5), generator=g, dtype=torch.int32)
    idx = torch.randint(0, 7, (2, 7, 9), generator=g, dtype=torch.int32)
    three = FA4.block_sparse_lists(cnt, idx, cnt, idx, n=150, q_block=32, kv_block=32)
    four = FA4.block_sparse_lists(cnt[:, None], idx[:, None], cnt[:, None].long(), idx[:, None], n=150, q_block=32,
                                  kv_block=32)
    for a, b in zip(three, four):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b)
    # 5 query blocks of 32 rows; index columns cut to the 5 key blocks (FA4 refuses more)
    assert three[0].shape == (2, 1, 5) and three[1].shape == (2, 1, 5, 5)
    assert torch.equal(three[1][:, 0], idx[:, :5, :5])
    compact = FA4.block_sparse_lists(cnt, idx[..., :3], cnt, idx[..., :3], n=150, q_block=32, kv_block=16)
    assert compact[1].shape == (2, 1, 5, 3)  # fewer columns than key blocks stay as they are
    with pytest.raises(ValueError, match="fewer than the 8"):
        FA4.block_sparse_lists(cnt, idx, cnt, idx, n=250, q_block=32, kv_block=32)
    with pytest.raises(ValueError, match="shape"):
        FA4.block_sparse_lists(cnt[:, None].expand(2, 4, 7), idx, cnt, idx, n=150, q_block=32, kv_block=32)


@pytest.mark.parametrize("case", ["padding", "residual", "softcap", "flex", "triton", "auto_off", "fp32", "shape"])
def test_fa4_not_used_where_it_does_not_apply(fake_fa4, case):
    """Padding, the residual, soft-capping, the kernel forced to flex or triton, fa4_auto off,
    float32 and an unmeasured shape all run another kernel, still exactly the
    selection (the oracle), and the fa4 counter stays 0."""
    n, batch = 120, 2
    cfg = _config(16, 0.3, 1, residual=case == "residual")
    dtype = torch.float32 if case == "fp32" else torch.float16
    q, k, v = random_qkv(batch, 4, 2, n, 32 if case != "shape" else 16, dtype=dtype, seed=3)
    shapes = {(32, 16, 16)} if case == "shape" else FAKE_SHAPES
    kv = left_padding(batch, n, [0, 17]) if case == "padding" else None
    kernel = {"flex": "flex", "triton": "triton", "auto_off": "auto"}.get(case, "fa4")
    kw = dict(softcap=20.0) if case == "softcap" else {}
    with flexwalk.options(prefill_kernel=kernel, fa4_auto=False, fa4_shapes=shapes):
        out, _ = sketchwalk_attention(q, k, v, cfg, 0, None, key_valid=kv, **kw)
    assert flexwalk.counters().get("fa4_prefill", 0) == 0 and flexwalk.counters()["sparse_prefill"] == 1
    assert not CALLS
    if case not in ("residual", "softcap"):  # those change the attention itself: their own tests
        _, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0, None, key_valid=kv)
        assert_matches_reference(q, k, v, token_mask(n, selection=sel, key_valid=kv), out)


def test_auto_takes_fa4_only_when_fa4_auto_is_on(fake_fa4):
    """fa4_auto True (the default since FA4 ran on an H100): "auto" takes FA4 where supported;
    False: "auto" leaves it alone."""
    assert flexwalk.Options().fa4_auto is True
    q, k, v = random_qkv(1, 4, 2, 100, 32, dtype=torch.float16, seed=2)
    with flexwalk.options(prefill_kernel="auto"):
        sketchwalk_attention(q, k, v, _config(16, 0.3, 1), 0, None)
        assert flexwalk.counters()["fa4_prefill"] == 1
        with flexwalk.options(fa4_auto=False):
            sketchwalk_attention(q, k, v, _config(16, 0.3, 1), 0, None)
        assert flexwalk.counters()["fa4_prefill"] == 1


def test_an_unknown_kernel_name_is_an_error():
    with pytest.raises(ValueError, match=r"prefill_kernel='cutlass' is invalid: allowed auto, fa4, triton, flex"):
        with flexwalk.options(prefill_kernel="cutlass"):
            pass


def test_fa4_is_not_available_without_flash_attn(monkeypatch):
    """No flash_attn.cute importable: available() is False and supported() says no, on any device."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import of flash_attn fails
    FA4.available.cache_clear()
    try:
        assert FA4.available() is False
        q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
        assert FA4.supported(q, q, q_block=128, kv_block=128) is False
    finally:
        FA4.available.cache_clear()


def test_an_installed_fa4_that_does_not_import_is_not_used_and_logged_once(monkeypatch, tmp_path, caplog):
    """flash_attn.cute is found but its import raises (as with a CUTLASS DSL lacking cutlass.cute):
    available() is False, the error is logged once, and a sparse prefill runs another kernel."""
    cute = tmp_path / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (cute / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'cutlass.cute'\")\n")
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    FA4.available.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="flexwalk"):
            assert FA4.available() is False
            assert FA4.available() is False
        logged = [r.getMessage() for r in caplog.records if "does not import" in r.getMessage()]
        assert len(logged) <= 1 and all("cutlass.cute" in m for m in logged)  # once per process
        q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
        with flexwalk.options(fa4_on_cpu=True):
            assert FA4.supported(q, q, q_block=128, kv_block=128, on_cpu=True) is False
    finally:
        FA4.available.cache_clear()


def test_a_broken_fa4_is_logged_once_per_process(tmp_path):
    cute = tmp_path / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (cute / "__init__.py").write_text("raise ImportError('libcute_dsl_runtime.so: cannot open shared object file')\n")
    code = ("import logging; logging.basicConfig(format='%(message)s')\n"
            "from flexwalk.kernels import fa4\n"
            "print(fa4.available()); fa4.available.cache_clear(); print(fa4.available())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    lines = [x for x in out.stderr.splitlines() if "does not import" in x]
    assert len(lines) == 1 and "ImportError: libcute_dsl_runtime.so" in lines[0], out.stderr


def test_device_ok_wants_a_cuda_device():
    assert FA4.device_ok(torch.device("cpu")) is False
