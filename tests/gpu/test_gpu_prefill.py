"""Sparse prefill on CUDA against the eager oracle, for every prefill kernel.

    python -m pytest -q tests/gpu/test_gpu_prefill.py      # needs a CUDA GPU (make test-gpu)

Long prompts are checked on sampled query rows (flexwalk.reference.rows_error_budget) against
the oracle of the layer's own selection (selection.driver.fused_block_selection: on CUDA the
Triton selection, which may break a tie at the budget's edge otherwise than the torch one); the
tolerance is the dtype's (reference.error_budget).  CPU runs skip it all.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

import flexwalk
from flexwalk import SketchWalkConfig, eager_sketchwalk_attention, sketchwalk_attention, token_mask
from flexwalk.kernels import fa4, triton_prefill
from flexwalk.kernels.flex import flex, kernel_mask_mod
from flexwalk.reference import error_budget, reference_error_budget, residual_reference
from flexwalk.selection.driver import fused_block_selection, fused_selection_mask
from flexwalk.prefill import TRITON_AUTO_SHAPES
from gpu_inputs import (dense_error, fa4_kernels_compiled, inputs, oracle_error, prefill_counts, real_rows,
                        sparse_config, triton_kernels_compiled)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KERNELS = {  # test id -> Options fields
    "triton": dict(prefill_kernel="triton"),
    "flex": dict(prefill_kernel="flex"),
    "fa4": dict(prefill_kernel="fa4", fa4_mask="causal"),
    "fa4_mask_mod": dict(prefill_kernel="fa4", fa4_mask="mask_mod"),
}
# (blocks, batch, query heads, KV heads, head dim, tokens, left padding of the last row): the
# 8B attention shape, SmolLM2's (9 / 3, head dim 64) and Gemma 3's (4 / 1, head dim 256), off the
# block grid, with and without padding
CASES = [
    ("128", 2, 32, 8, 128, 3000, 0), ("128", 2, 32, 8, 128, 20000, 6666), ("128", 2, 32, 8, 64, 8000, 2666),
    ("64", 2, 9, 3, 64, 3000, 1000), ("64", 2, 9, 3, 64, 20000, 0), ("q128kv64", 2, 32, 8, 128, 8000, 2666),
    ("q128kv64", 2, 32, 8, 128, 20000, 0), ("64", 2, 4, 1, 256, 5000, 1666), ("128", 2, 4, 1, 256, 3000, 0),
    ("128", 1, 32, 8, 128, 8192, 0), ("128", 1, 32, 8, 128, 40000, 0), ("64", 16, 9, 3, 64, 8192, 0),
    ("64", 4, 4, 1, 256, 32768, 0), ("64", 1, 32, 8, 128, 32768, 0),
]


def _case_id(case):
    spec, batch, hq, hkv, d, n, pad = case
    return f"{spec}-b{batch}-h{hq}x{hkv}-d{d}-n{n}" + (f"-pad{pad}" if pad else "")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("block", [64, 128])
def test_two_layers_with_padding_match_the_oracle(dtype, block):
    """Two layers (the walk carried), batch 2 with the last row left-padded, GQA 32 / 8, head dim
    128, against the eager oracle on every real row; the walks agree to fp32 rounding."""
    n = 2037
    q, k, v, kv = inputs(2, 32, 8, n, 128, pad=3 * block + 5, seed=block, dtype=dtype)
    cfg = sparse_config(str(block))
    st_f = st_o = None
    for layer in range(2):
        out, st_f = sketchwalk_attention(q, k, v, cfg, layer, st_f, key_valid=kv)
        _, st_o, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, st_o, key_valid=kv)
        rows = kv[-1]
        mask = token_mask(n, selection=sel, key_valid=kv)
        err, budget = reference_error_budget(q[..., rows, :], k, v, mask[..., rows, :], out[..., rows, :])
        assert err <= budget, (layer, err, budget)
        nb = st_o.transition.shape[-1]
        assert torch.allclose(st_f.transition[..., :nb, :nb], st_o.transition, rtol=0, atol=1e-6), layer
        assert bool(torch.isfinite(out).all())
        assert 0 < sel.density() < 0.6


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_each_kernel_matches_the_oracle(kernel, case):
    """Three layers (the walk carried, a dense tail of two query blocks) through one prefill
    kernel, each layer against the oracle of its own selection; the kernel asked for runs
    wherever it applies (FA4: installed, Hopper, its shapes, no padding), the next one elsewhere."""
    if kernel.startswith("fa4") and not fa4.available():
        pytest.skip("FlashAttention 4 (flash_attn.cute) is not installed")
    spec, batch, hq, hkv, d, n, pad = case
    q, k, v, kv = inputs(batch, hq, hkv, n, d, pad=pad, seed=n + d)
    cfg = sparse_config(spec, dense_tail_blocks=2)
    rows = real_rows(n, pad)
    flexwalk.reset_counters()
    with flexwalk.options(**KERNELS[kernel]):
        st = None
        for layer in range(3):
            sel, _ = fused_block_selection(q, k, cfg, layer, st, key_valid=kv)
            out, st = sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=kv)
            err, budget = oracle_error(q, k, v, out, sel, kv, rows)
            assert err <= budget, (layer, err, budget)
            assert bool(torch.isfinite(out[:, :, pad:]).all()) and bool(torch.isfinite(out[0]).all())
    counts = prefill_counts()
    blocks = dict(q_block=cfg.q_block, kv_block=cfg.block_size)
    fa4_runs = kernel.startswith("fa4") and fa4.supported(q, k, padded=kv is not None, **blocks)
    triton_runs = not fa4_runs and kernel != "flex" and triton_prefill.supported(q, **blocks) and (
        kernel == "triton" or (d, cfg.q_block, cfg.block_size) in TRITON_AUTO_SHAPES)
    assert counts["sparse_prefill"] == 3
    assert counts["fa4_prefill"] == (3 if fa4_runs else 0), counts
    assert counts["triton_prefill"] == (3 if triton_runs else 0), counts


def test_fa4_leaves_the_residual_to_the_triton_kernel():
    """FA4 does not take the residual: with prefill_kernel="fa4" such a layer runs the Triton
    kernel (padding is the other case, in test_each_kernel_matches_the_oracle)."""
    if not fa4.available():
        pytest.skip("FlashAttention 4 (flash_attn.cute) is not installed")
    q, k, v, _ = inputs(1, 32, 8, 5000, 128, seed=5)
    with flexwalk.options(prefill_kernel="fa4"):
        sketchwalk_attention(q, k, v, sparse_config("128", residual=True), 0)
    counts = prefill_counts()
    assert counts["fa4_prefill"] == 0 and counts["triton_prefill"] == 1 and counts["residual"] == 1, counts


RESIDUAL_CASES = [("128", 32, 8, 128, 3000), ("64", 4, 1, 256, 8000), ("64", 9, 3, 64, 6000)]


@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=lambda c: f"{c[0]}-h{c[1]}x{c[2]}-d{c[3]}-n{c[4]}")
@pytest.mark.parametrize("kernel", ["triton", "flex"])
def test_the_residual_matches_its_reference(kernel, case):
    """residual=True (the summaries of the blocks a query skips), three layers, batch 2 with left
    padding: the Triton kernel's summary loop and flex's appended keys each against
    reference.residual_reference on the layer's own selection; the residual moves the output by
    more than the tolerance (the test means something)."""
    spec, hq, hkv, d, n = case
    pad = n // 3 + 5
    q, k, v, kv = inputs(2, hq, hkv, n, d, pad=pad, seed=n + d)
    cfg = sparse_config(spec, residual=True)
    with flexwalk.options(prefill_kernel=kernel):
        plain, _ = sketchwalk_attention(q, k, v, cfg.replace(residual=False), 0, key_valid=kv)
        flexwalk.reset_counters()
        st = None
        for layer in range(3):
            sel, _ = fused_block_selection(q, k, cfg, layer, st, key_valid=kv)
            out, st = sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=kv)
            mask = token_mask(n, selection=sel, key_valid=kv)
            ref_lp = residual_reference(q, k, v, mask, sel, key_valid=kv)
            ref_hp = residual_reference(q.double(), k.double(), v.double(), mask, sel, key_valid=kv)
            err, budget = error_budget(out[:, :, pad:], ref_lp[:, :, pad:], ref_hp[:, :, pad:])
            assert err <= budget, (layer, err, budget)
            assert bool(torch.isfinite(out[:, :, pad:]).all())
            if layer == 0:
                moved = (out[:, :, pad:].double() - plain[:, :, pad:].double()).abs().max().item()
                assert moved > budget, (moved, budget)
    counts = prefill_counts()
    assert counts["residual"] == 3, counts
    assert counts["triton_prefill"] == (3 if kernel == "triton" else 0), counts


@pytest.mark.parametrize("kernel,residual", [("triton", False), ("triton", True), ("flex", False), ("flex", True),
                                             ("fa4", False)])
def test_no_compiles_within_a_length_bucket(kernel, residual):
    """Ten prompt lengths in one length bucket (5120 tokens) after a warm-up, two layers with the
    walk: no new dynamo graph, no new Triton kernel (prefill, selection, residual), no new FA4
    kernel (its compile key holds no length)."""
    if kernel == "fa4" and not fa4.available():
        pytest.skip("FlashAttention 4 (flash_attn.cute) is not installed")
    cfg = sparse_config("128", residual=residual)

    def run(n):
        q, k, v, _ = inputs(1, 32, 8, n, 128, seed=n)
        with torch.no_grad():
            st = None
            for layer in range(2):
                _, st = sketchwalk_attention(q, k, v, cfg, layer, st)

    with flexwalk.options(prefill_kernel=kernel):
        for n in (4097, 4500, 4224):
            run(n)
        torch.cuda.synchronize()
        before = (dynamo_counters["stats"]["unique_graphs"], triton_kernels_compiled(), fa4_kernels_compiled())
        flexwalk.reset_counters()
        for n in (4100, 4300, 4352, 4500, 4700, 4900, 5000, 5100, 5120, 4600):
            run(n)
        torch.cuda.synchronize()
    after = (dynamo_counters["stats"]["unique_graphs"], triton_kernels_compiled(), fa4_kernels_compiled())
    assert after == before, f"(dynamo graphs, Triton kernels, FA4 kernels) {before} -> {after}"
    counts = prefill_counts()
    assert counts["sparse_prefill"] == 20 and counts["residual"] == (20 if residual else 0), counts
    assert counts[f"{kernel}_prefill" if kernel != "flex" else "sparse_prefill"] == 20, counts


@pytest.mark.parametrize("spec,hq,hkv,d", [("128", 32, 8, 128), ("64", 9, 3, 64), ("q128kv64", 32, 8, 128)])
@pytest.mark.parametrize("n", [8000, 20000])
def test_flex_with_the_kernel_mask_mod_matches_the_oracle(spec, hq, hkv, d, n):
    """flex with the kernel's cheap mask_mod (and rows guaranteed safe), as prefill runs it
    without padding, and with the BlockMask's full mask_mod: both the oracle of the selection."""
    q, k, v, _ = inputs(1, hq, hkv, n, d, seed=n + d)
    cfg = sparse_config(spec)
    bm, _, _, _ = fused_selection_mask(q, k, cfg, 0, None)
    sel, _ = fused_block_selection(q, k, cfg, 0, None)
    tiles = dict(block_size=cfg.block_size, q_block=cfg.q_block)
    rows = real_rows(n)
    for out in (flex(q, k, v, bm, kernel_mask_mod=kernel_mask_mod(), **tiles), flex(q, k, v, bm, **tiles)):
        out = out[:, :, :n]
        err, budget = oracle_error(q, k, v, out, sel, None, rows)
        assert err <= budget and bool(torch.isfinite(out).all()), (err, budget)


def test_the_dense_tail_apart_matches_the_oracle():
    """flex with the dense tail (the last query block, every causal key) computed by a call of its
    own on a side stream, and inside the block-sparse kernel: both the oracle of the selection."""
    n = 32768
    q, k, v, _ = inputs(1, 32, 8, n, 128, seed=7)
    cfg = sparse_config("128")
    sel, _ = fused_block_selection(q, k, cfg, 0, None)
    rows = real_rows(n)
    for split, calls in (("always", 1), ("never", 0)):
        flexwalk.reset_counters()
        with flexwalk.options(prefill_kernel="flex", split_dense_tail=split):
            out, _ = sketchwalk_attention(q, k, v, cfg, 0)
        assert prefill_counts()["dense_tail_split"] == calls, split
        err, budget = oracle_error(q, k, v, out, sel, None, rows)
        assert err <= budget and bool(torch.isfinite(out).all()), (split, err, budget)


def test_full_budget_equals_dense_attention_at_the_8b_shape():
    """Density 1 (every causal block) with each kernel at 32K tokens: dense causal attention."""
    n = 32768
    q, k, v, _ = inputs(1, 32, 8, n, 128, seed=8)
    rows = real_rows(n)
    for kernel in ("triton", "flex") + (("fa4",) if fa4.available() else ()):
        with flexwalk.options(prefill_kernel=kernel):
            out, _ = sketchwalk_attention(q, k, v, sparse_config("128", density=1.0), 0)
        err, budget = dense_error(q, k, v, out, rows)
        assert err <= budget, (kernel, err, budget)


def test_short_prompts_run_dense_by_default_on_cuda():
    """dense_below="auto" is 8192 on CUDA: a 4K prompt's layer is exact dense attention."""
    q, k, v, _ = inputs(1, 32, 8, 4096, 128, seed=9)
    out, _ = sketchwalk_attention(q, k, v, SketchWalkConfig(block_size=128, dense_layers=0), 0)
    assert flexwalk.counters().get("dense_short") == 1 and not prefill_counts()["sparse_prefill"]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, ref)
