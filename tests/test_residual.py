"""The residual (flexwalk.kernels.residual, `SketchWalkConfig.residual`): each query also attends one
summary entry per dropped key block before its query block (mean key, mean value, logit raised
by log(count)).  Both kernels (compiled flex on CPU; the Triton kernel through triton's
interpreter) against the oracle's dense version of the same rule (reference.residual_reference),
with error budgets from the dtype: twice the same-dtype reference's own error against float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexwalk
from conftest import left_padding, random_qkv
from flexwalk import SketchWalkConfig, dense_attention, eager_sketchwalk_attention, sketchwalk_attention
from flexwalk.reference import residual_reference, token_mask
from flexwalk.kernels.residual import block_summaries, residual_allowed
from flexwalk.kernels.triton_prefill import HAS_TRITON


def _assert_matches_residual_reference(q, k, v, sel, kv, out, softcap=None):
    mask = token_mask(q.shape[2], selection=sel, key_valid=kv)
    ref_lp = residual_reference(q, k, v, mask, sel, key_valid=kv, softcap=softcap)
    ref_hp = residual_reference(q.double(), k.double(), v.double(), mask, sel, key_valid=kv, softcap=softcap)
    real = slice(None) if kv is None else kv[:, None, :, None]  # padding rows: any finite value
    err_ref = ((ref_lp.double() - ref_hp).abs() * (1 if kv is None else real)).max().item()
    err = ((out.double() - ref_hp).abs() * (1 if kv is None else real)).max().item()
    eps = torch.finfo(q.dtype).eps
    ulp = eps * max(1.0, ref_hp.abs().max().item())
    capped = 0.0 if softcap is None else softcap * eps * v.abs().max().item()
    allowed = 2 * err_ref + 4 * ulp + capped
    assert err <= allowed, f"max error {err:.3e} exceeds budget {allowed:.3e}"


@pytest.mark.parametrize("summary_kernel", ["torch", "triton"])
def test_block_summaries_are_means_over_real_keys(summary_kernel):
    """Mean key / value and log count per block, over the keys inside [start, end) only (left
    and right padding, a partial last block, empty blocks -inf, values strided as transformers
    passes them), against a loop; torch ops and the Triton kernel (the interpreter on CPU)."""
    if summary_kernel == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    q, k, v = random_qkv(2, 2, 2, 37, 8, seed=1)
    v = v.transpose(1, 2).contiguous().transpose(1, 2)
    start = torch.tensor([0, 11], dtype=torch.int32)
    end = torch.tensor([37, 30], dtype=torch.int32)
    km, vm, lc = block_summaries(k, v, start, end, 8, num_blocks=6, kernel=summary_kernel)
    assert km.shape == (2, 2, 6, 8) and lc.shape == (2, 6)
    for b in range(2):
        for j in range(6):
            toks = [t for t in range(j * 8, min(j * 8 + 8, 37)) if start[b] <= t < end[b]]
            if not toks:
                assert lc[b, j] == float("-inf")
                continue
            assert torch.allclose(lc[b, j], torch.tensor(float(len(toks))).log())
            assert torch.allclose(km[b, :, j], k[b, :, toks].mean(1), atol=1e-6)
            assert torch.allclose(vm[b, :, j], v[b, :, toks].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="num_blocks=4"):
        block_summaries(k, v, start, end, 8, num_blocks=4)


def test_allowed_summaries_are_the_dropped_blocks_before_the_query_block():
    table = torch.zeros(1, 4, 8, dtype=torch.bool)
    table[0, 3, [0, 5, 6, 7]] = True
    lc = torch.zeros(1, 8)
    lc[0, 2] = float("-inf")  # an empty block
    ok = residual_allowed(table, lc, torch.tensor([0, 15, 31, 63]), 16, 8)  # query blocks of 2 key blocks
    assert ok[0, 0].sum() == 0 and ok[0, 1].sum() == 0  # query block 0: nothing before it
    assert ok[0, 2].tolist() == [True, True, False, False, False, False, False, False]
    assert ok[0, 3].tolist() == [False, True, False, True, True, False, False, False]


@pytest.fixture(params=["flex", "triton"])
def kernel(request):
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    with flexwalk.options(prefill_kernel=request.param):
        yield request.param


def _run_layers(q, k, v, cfg, kv, softcap=None, layers=2):
    st_t = st_o = None
    for layer in range(layers):
        out, st_t = sketchwalk_attention(q, k, v, cfg, layer, st_t, key_valid=kv, softcap=softcap)
        _, st_o, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, st_o, key_valid=kv, softcap=softcap)
        assert out.shape == q.shape and torch.isfinite(out).all()
        _assert_matches_residual_reference(q, k, v, sel, kv, out, softcap=softcap)
    return out, sel


@pytest.mark.parametrize("kernel_name", ["flex", "triton"])
@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(40, 300),
    bs=st.sampled_from([16, 32]),
    m=st.sampled_from([1, 2]),
    g=st.sampled_from([1, 3]),
    batch=st.sampled_from([1, 2]),
    density=st.floats(0.05, 0.6),
    pad=st.integers(0, 90),
    half=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_residual_equals_oracle(kernel_name, n, bs, m, g, batch, density, pad, half, seed):
    """Two layers with the walk carried, through the kernel under test, against the oracle's
    dense version of the same rule: blocks 16/32, query blocks x1/x2, GQA, left padding
    (partly padded blocks summarise their real keys only), dense tails 0-2, float32 and float16."""
    cfg = SketchWalkConfig(block_size=bs, query_block_size=bs * m if m > 1 else None, density=density,
                           dense_layers=0, dense_below=0, sketch_dim=16, dense_tail_blocks=seed % 3, residual=True)
    pad = min(pad, n - 1) if batch == 2 else 0
    q, k, v = random_qkv(batch, 2 * g, 2, n, 16, dtype=torch.float16 if half else torch.float32, seed=seed)
    kv = left_padding(batch, n, [0, pad][:batch]) if pad else None
    if kernel_name == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    with flexwalk.options(prefill_kernel=kernel_name):
        flexwalk.reset_counters()
        _run_layers(q, k, v, cfg, kv)
    c = flexwalk.counters()
    assert c["residual"] == 2 and c["sparse_prefill"] == 2
    assert c.get("triton_prefill", 0) == (2 if kernel_name == "triton" else 0)


def test_residual_on_the_sketch_path_equals_oracle(kernel):
    """The path that keeps the layer's sketch (prefill before sparse decode, tensor parallelism):
    its selection table is padded to the bucket for the summaries; against the oracle at 20%,
    with left padding and a length off the block grid."""
    from flexwalk.selection.sketch import layer_sketch

    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_layers=0, dense_below=0, sketch_dim=16, residual=True)
    q, k, v = random_qkv(2, 4, 2, 233, 16, seed=11)
    kv = left_padding(2, 233, [0, 50])
    out, _ = sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv, sketch=layer_sketch(q, k, cfg, 0, key_valid=kv))
    _, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
    _assert_matches_residual_reference(q, k, v, sel, kv, out)
    assert flexwalk.counters()["residual"] == 1


def test_residual_with_softcap_on_flex():
    """Soft-capped layers (flex only): the summaries' scores are capped before log(count)."""
    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_layers=0, dense_below=0, sketch_dim=16, residual=True)
    q, k, v = random_qkv(2, 4, 2, 200, 16, seed=5)
    _run_layers(q * 3, k, v, cfg, left_padding(2, 200, [0, 37]), softcap=5.0)


def test_residual_is_exact_when_blocks_are_constant(kernel):
    """When every key block holds one repeated key, a block's summary carries its exact softmax
    mass and value sum: with the residual, any selection gives dense attention.  Without it, the
    same selection does not.  (The Triton kernel case also computes the summaries with their
    Triton kernel, as on a GPU.)"""
    with flexwalk.options(summary_kernel="triton" if kernel == "triton" else "auto"):
        _residual_is_exact_when_blocks_are_constant()


def _residual_is_exact_when_blocks_are_constant():
    n, bs = 256, 16
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=7)
    k = k[:, :, ::bs].repeat_interleave(bs, 2)  # constant keys per block, values vary
    kv = left_padding(2, n, [0, 21])  # a partly padded block: its real keys are still equal
    real = kv[:, None, :, None]
    dense = dense_attention(q, k, v, key_valid=kv)
    cfg = SketchWalkConfig(block_size=bs, density=0.1, dense_layers=0, dense_below=0, sketch_dim=16)
    out_res, _ = sketchwalk_attention(q, k, v, cfg.replace(residual=True), 0, key_valid=kv)
    out_sel, _ = sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
    assert ((out_res - dense).abs() * real).max() < 1e-5
    assert ((out_sel - dense).abs() * real).max() > 1e-2


def test_full_budget_with_residual_is_dense(kernel):
    """Nothing dropped, nothing summarised: density 1 with the residual is dense attention."""
    q, k, v = random_qkv(2, 4, 2, 150, 16, seed=3)
    kv = left_padding(2, 150, [0, 40])
    cfg = SketchWalkConfig(block_size=16, density=1.0, dense_layers=0, dense_below=0, sketch_dim=16, residual=True)
    out, _ = sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
    ref = dense_attention(q, k, v, key_valid=kv)
    assert ((out - ref).abs() * kv[:, None, :, None]).max() < 1e-5


def test_residual_moves_a_repetitive_context_toward_dense():
    """The case the residual exists for (docs/algorithm.md): a query spreading its mass over many
    similar blocks.  Keys are a repeated pattern plus small noise, so the dropped blocks hold
    most of the mass; the residual at least halves the error against dense attention (2.7x
    here: what remains is the blocks' spread around their means)."""
    g = torch.Generator().manual_seed(0)
    n, bs, d = 512, 16, 16
    base = torch.randn(1, 1, bs, d, generator=g)
    k = base.repeat(1, 2, n // bs, 1) + 0.05 * torch.randn(1, 2, n, d, generator=g)
    v = torch.randn(1, 2, n, d, generator=g)
    q = torch.randn(1, 4, n, d, generator=g)
    dense = dense_attention(q, k, v)
    cfg = SketchWalkConfig(block_size=bs, density=0.2, dense_layers=0, dense_below=0, sketch_dim=16)
    err_sel = (sketchwalk_attention(q, k, v, cfg, 0)[0] - dense).norm()
    err_res = (sketchwalk_attention(q, k, v, cfg.replace(residual=True), 0)[0] - dense).norm()
    assert err_res < err_sel / 2, (err_res, err_sel)


def test_residual_setting_is_validated():
    with pytest.raises(ValueError, match=r"residual='yes'.*must be a bool or 'auto'"):
        SketchWalkConfig(residual="yes")
    with pytest.raises(ValueError, match=r"residual=1 .*must be a bool or 'auto'"):
        SketchWalkConfig(residual=1)
    assert SketchWalkConfig.from_dict(SketchWalkConfig(residual=True).to_dict()).residual is True
    assert SketchWalkConfig().residual == "auto" and not SketchWalkConfig().uses_residual
    # "auto" is decided per model; an explicit setting is kept whatever the model
    assert SketchWalkConfig().for_model(True).residual is True
    assert SketchWalkConfig().for_model(False).residual is False
    for explicit in (True, False):
        assert SketchWalkConfig(residual=explicit).for_model(not explicit).residual is explicit


def test_auto_residual_is_off_outside_a_model():
    """sketchwalk_attention called directly knows no model: residual="auto" computes what
    residual=False computes, and counts no residual."""
    q, k, v = random_qkv(1, 4, 2, 160, 16, seed=11)
    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_layers=0, dense_below=0, sketch_dim=16)
    out_auto, _ = sketchwalk_attention(q, k, v, cfg, 0)
    assert "residual" not in flexwalk.counters()
    out_off, _ = sketchwalk_attention(q, k, v, cfg.replace(residual=False), 0)
    out_on, _ = sketchwalk_attention(q, k, v, cfg.replace(residual=True), 0)
    assert torch.equal(out_auto, out_off) and not torch.allclose(out_auto, out_on)


def test_model_is_hybrid_reads_layer_types():
    from flexwalk.integrations.settings import model_is_hybrid
    from tiny_models import ARCHS

    assert model_is_hybrid(ARCHS["gemma3"].config()) and model_is_hybrid(ARCHS["gemma2"].config())
    assert not model_is_hybrid(ARCHS["llama"].config())
    assert not model_is_hybrid(ARCHS["mistral"].config())  # every layer sliding: nothing to mix
    assert not model_is_hybrid(object())  # no layer_types


@pytest.mark.parametrize("name", ["gemma3", "llama"])
def test_auto_residual_through_transformers(name, caplog):
    """residual="auto" (the default) in a model: on in every sparse full-attention layer of a model
    that mixes sliding-window and full-attention layers (tiny Gemma 3: counted, logged once, and
    the same logits as residual=True), off in a model of full-attention layers only (tiny Llama:
    the same logits as residual=False); residual=False turns it off in the hybrid model."""
    import logging

    from flexwalk import stats
    from tiny_models import ARCHS, build_model, random_ids

    stats.forget_logged()
    hybrid = name == "gemma3"
    n_sparse = sum(not s for s in ARCHS[name].layer_is_sliding())
    ids = random_ids(2, 100, seed=3)
    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_below=0, dense_layers=0, dense_tail_blocks=0)
    model = build_model(name, "sketchwalk_flex")
    logits = {}
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="flexwalk"):
        for setting in ("auto", True, False):
            flexwalk.reset_counters()
            logits[setting] = flexwalk.configure(model, cfg.replace(residual=setting))(ids).logits
            want = n_sparse if setting is True or (setting == "auto" and hybrid) else 0
            assert flexwalk.counters().get("residual", 0) == want, (setting, flexwalk.counters())
    assert torch.equal(logits["auto"], logits[True if hybrid else False])
    from flexwalk.integrations.settings import effective_config, resolve_config

    attn = next(m for m in model.modules() if hasattr(m, "layer_idx"))
    flexwalk.configure(model, cfg)
    assert resolve_config(attn).residual == "auto" and effective_config(attn).residual is hybrid
    assert not torch.allclose(logits[True], logits[False])  # the residual changes the output here
    logged = sum("residual='auto' is on" in r.getMessage() for r in caplog.records)
    assert logged == (1 if hybrid else 0)


def test_residual_through_transformers_prefill_and_sparse_decode(caplog):
    """A tiny Llama with residual=True and sparse decode: at full budget nothing is dropped, so
    generate() reproduces sdpa's tokens; every sparse prefill layer counts 'residual', and the
    decode steps log once that the residual is prefill-only."""
    import logging
    import os
    import sys

    from flexwalk import stats

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import build_model, random_ids

    stats.forget_logged()
    ids = random_ids(2, 100, seed=1)
    cfg = SketchWalkConfig(block_size=16, density=1.0, dense_below=0, dense_layers=1, skip_decode=False,
                           residual=True)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="flexwalk"):
        ref = build_model("llama", "sdpa").generate(ids, **gen)
        flexwalk.reset_counters()
        out = flexwalk.configure(build_model("llama", "sketchwalk_flex"), cfg).generate(ids, **gen)
    assert torch.equal(out, ref)
    c = flexwalk.counters()
    assert c["residual"] == c["sparse_prefill"] > 0 and c["sparse_decode"] > 0
    assert sum("residual=True applies to prefill" in r.getMessage() for r in caplog.records) == 1


def test_dense_layers_auto_is_decided_per_model():
    """dense_layers="auto": 2 outside a model and in models without sliding-window layers; in a
    hybrid model raised to cover its first full-attention layer (never lowered); an int stays."""
    cfg = SketchWalkConfig()
    assert cfg.dense_layers == "auto" and cfg.dense_layer_count == 2
    assert cfg.for_model(True, 5).dense_layers == 6  # Gemma 3: full layers at 5, 11, 17
    assert cfg.for_model(True, 1).dense_layers == 2  # Gemma 2: full layers at 1, 3, ...
    assert cfg.for_model(False, 0).dense_layers == 2 and cfg.for_model(True, None).dense_layers == 2
    assert cfg.replace(dense_layers=0).for_model(True, 5).dense_layers == 0
    assert cfg.for_model(True, 5).residual is True and cfg.for_model(False).residual is False
    from flexwalk import expected_density

    assert expected_density(cfg, 4096, num_layers=10) == expected_density(cfg.replace(dense_layers=2), 4096, 10)


def test_dense_layers_auto_through_transformers(caplog):
    """A tiny Gemma 3 whose first full-attention layer is index 3 (of full layers 3 and 5): with
    dense_layers="auto" layer 3 runs dense and only layer 5 sparse (counted, logged once, the
    same logits as dense_layers=4); the tiny Llama keeps 2 dense layers."""
    import logging

    import transformers

    from flexwalk import stats
    from flexwalk.integrations.settings import effective_config, first_full_attention_layer
    from tiny_models import ARCHS, build_model, random_ids

    stats.forget_logged()
    mc = ARCHS["gemma3"].config()
    mc.num_hidden_layers = 6
    mc.layer_types = ["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"]
    assert isinstance(mc, transformers.Gemma3TextConfig) and first_full_attention_layer(mc) == 3
    model = build_model("gemma3", "sketchwalk_flex", config=mc)
    ids = random_ids(2, 100, seed=5)
    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_below=0, dense_tail_blocks=0, residual=False)
    logits = {}
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="flexwalk"):
        for setting in ("auto", 4, 2):
            flexwalk.reset_counters()
            logits[setting] = flexwalk.configure(model, cfg.replace(dense_layers=setting))(ids).logits
            c = flexwalk.counters()
            assert (c.get("dense_layer", 0), c.get("sparse_prefill", 0)) == ((0, 2) if setting == 2 else (1, 1)), c
    assert torch.equal(logits["auto"], logits[4]) and not torch.allclose(logits["auto"], logits[2])
    flexwalk.configure(model, cfg)
    attn = next(m for m in model.modules() if getattr(m, "layer_idx", None) == 5)
    assert effective_config(attn).dense_layers == 4
    assert sum("dense_layers='auto' is 4" in r.getMessage() for r in caplog.records) == 1
    llama = build_model("llama", "sketchwalk_flex")
    flexwalk.configure(llama, cfg)
    attn = next(m for m in llama.modules() if hasattr(m, "layer_idx"))
    assert effective_config(attn).dense_layers == 2
