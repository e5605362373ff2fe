"""Integration tests: attn_implementation="sketchwalk_flex" on tiny random-weight models.

Each architecture is built offline from a config (tests/tiny_models.py) with seeded weights,
so the eager / sdpa / sketchwalk_flex instances of one architecture share their weights.
Tolerances are derived from the reference's own error (sdpa vs eager, or low precision vs
fp32) with an fp32 floor; exact equality is asserted where the computation is identical.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import flexwalk
from flexwalk import PRESETS, SketchWalkConfig
from flexwalk.integrations import transformers as fw_tf
from flexwalk.integrations.cache_kwarg import cache_kwargs
from flexwalk.integrations.settings import coerce_config, resolve_config

sys.path.insert(0, os.path.dirname(__file__))
from conftest import FP32_FLOOR, floor_tol  # noqa: E402
from tiny_models import ARCHS, VOCAB, build_model, random_ids  # noqa: E402

SEQ = 100  # spans 7 blocks of 16 / 4 blocks of 32, a multiple of neither; > SMALL_QUERY
BATCH = 2
NEW_TOKENS = 5

# (dense_layers, block_size) per architecture for the full-budget checks: both block sizes
# and both dense-layer settings are exercised across the architectures.
FULL_BUDGET = {
    "llama": (0, 16),
    "smollm2": (1, 32),
    "mistral": (0, 16),
    "qwen2": (1, 16),
    "qwen3": (0, 32),
    "phi3": (1, 16),
    "gemma2": (0, 16),
    "gemma3": (1, 32),
    "granite": (0, 16),
    "olmo2": (1, 16),
    "smollm3": (0, 32),
    "cohere": (1, 16),
}
ARCH_NAMES = list(FULL_BUDGET)  # starcoder2 runs in test_masks.py only
SPARSE = SketchWalkConfig(density=0.3, dense_below=0, dense_layers=0, block_size=16)


def full_cfg(name: str) -> SketchWalkConfig:
    dense_layers, bs = FULL_BUDGET[name]
    return SketchWalkConfig(density=1.0, dense_below=0, dense_layers=dense_layers, block_size=bs)


@pytest.fixture(autouse=True)
def _isolated():
    """Seeded and without grad; compiled kernels are shared across tests, as in a real process."""
    torch.manual_seed(0)
    with torch.no_grad():
        yield


@functools.lru_cache(maxsize=None)
def _model(name: str, attn: str, dtype: torch.dtype = torch.float32):
    return build_model(name, attn, dtype)


@pytest.fixture(scope="module")
def models():
    """models(name, attn[, dtype]) -> a cached, seeded model (weights equal across attn impls)."""
    yield _model
    _model.cache_clear()


def sliding_layers(name: str) -> list[bool]:
    return ARCHS[name].layer_is_sliding()


def expected_counters(name: str, cfg: SketchWalkConfig, seq_len: int = SEQ) -> dict[str, int]:
    want: dict[str, int] = {}
    for i, sliding in enumerate(sliding_layers(name)):
        if sliding:
            key = "sliding_window"
        elif i < cfg.dense_layer_count:
            key = "dense_layer"
        elif seq_len < cfg.min_sparse_length("cpu"):
            key = "dense_short"
        else:
            key = "sparse_prefill"
        want[key] = want.get(key, 0) + 1
    sliding = sliding_layers(name)
    # residual="auto" (the default) is on in models that mix sliding-window and full layers
    if want.get("sparse_prefill") and (cfg.residual is True or cfg.residual == "auto" and any(sliding)):
        want["residual"] = want["sparse_prefill"]
    return want


def reference_logits(models, name: str, ids: torch.Tensor, **kw) -> tuple[torch.Tensor, float]:
    """(eager logits, tolerance): tolerance = a multiple of sdpa-vs-eager error, with an fp32 floor."""
    eager = models(name, "eager")(ids, **kw).logits
    ref_err = 0.0
    if ARCHS[name].supports_sdpa:
        sdpa = models(name, "sdpa")(ids, **kw).logits
        ref_err = (sdpa - eager).abs().max().item()
    scale = max(1.0, eager.abs().max().item())
    return eager, max(8.0 * ref_err, FP32_FLOOR * scale)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    err = max_err(out, ref)
    assert err <= tol, f"{what}: max |out - ref| = {err:.3g} > tol {tol:.3g}"


# --------------------------------------------------------------------------- weights sanity
def test_seeded_builds_share_weights(models):
    a, b = models("llama", "eager"), models("llama", "sketchwalk_flex")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.config._attn_implementation == "sketchwalk_flex"


# --------------------------------------------------------------------------- full budget vs eager
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_full_budget_matches_eager(models, name):
    cfg = full_cfg(name)
    ids = random_ids(BATCH, SEQ, seed=1)
    ref, tol = reference_logits(models, name, ids)
    model = flexwalk.configure(models(name, "sketchwalk_flex"), cfg)
    flexwalk.reset_counters()
    out = model(ids).logits
    counts = flexwalk.counters()
    assert torch.isfinite(out).all()
    err = max_err(out, ref)
    assert err <= tol, f"{name}: max |sketchwalk - eager| = {err:.3g} > tol {tol:.3g}"
    assert counts == expected_counters(name, cfg), counts
    n_sparse = sum(1 for i, s in enumerate(sliding_layers(name)) if not s and i >= cfg.dense_layer_count)
    assert counts.get("sparse_prefill", 0) == n_sparse


# --------------------------------------------------------------------------- sparse budget
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_sparse_budget_is_sparse(models, name):
    ids = random_ids(BATCH, SEQ, seed=1)
    model = models(name, "sketchwalk_flex")
    dense = flexwalk.configure(model, SPARSE.replace(density=1.0))(ids).logits
    flexwalk.reset_counters()
    out = flexwalk.configure(model, SPARSE)(ids).logits
    counts = flexwalk.counters()
    report = flexwalk.density_report()
    assert torch.isfinite(out).all()
    assert counts == expected_counters(name, SPARSE), counts
    sparse_layers = [i for i, s in enumerate(sliding_layers(name)) if not s]
    assert sorted(report) == sparse_layers
    want_density = flexwalk.expected_density(SPARSE, SEQ)
    assert want_density < 1.0
    for layer, d in report.items():
        assert d < 1.0, (layer, d)
        assert d == pytest.approx(want_density, abs=1e-6), (layer, d, want_density)
    if sparse_layers:
        assert max_err(out, dense) > 1e-3, f"{name}: sparse output equals dense: sparsity not applied"
    else:
        # Every layer is a sliding-window layer: it keeps its window, dense inside it.
        assert_close(out, dense, floor_tol(dense), f"{name}: all-sliding model at a sparse budget")


# --------------------------------------------------------------------------- generate
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_generate_greedy(models, name):
    ids = random_ids(BATCH, SEQ, seed=2)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = models(name, "sdpa" if ARCHS[name].supports_sdpa else "eager").generate(ids, **gen)
    model = flexwalk.configure(models(name, "sketchwalk_flex"), full_cfg(name))
    flexwalk.reset_counters()
    out = model.generate(ids, **gen)
    counts = flexwalk.counters()
    assert out.shape == (BATCH, SEQ + NEW_TOKENS)
    assert torch.equal(out, ref), f"{name}: {out[:, SEQ:].tolist()} != {ref[:, SEQ:].tolist()}"
    n_layers = len(sliding_layers(name))
    want = expected_counters(name, full_cfg(name))
    want["dense_decode"] = (NEW_TOKENS - 1) * n_layers
    assert counts == want, counts

    # at a sparse budget generate still runs (sparse prefill, dense decode)
    flexwalk.configure(model, SPARSE.replace(block_size=full_cfg(name).block_size))
    flexwalk.reset_counters()
    out = model.generate(ids, **gen)
    assert out.shape == (BATCH, SEQ + NEW_TOKENS)
    assert torch.equal(out[:, :SEQ], ids)
    assert flexwalk.counters()["dense_decode"] == (NEW_TOKENS - 1) * n_layers


# --------------------------------------------------------------------------- left padding
PAD_ARCHS = ["llama", "qwen2", "gemma2", "gemma3"]


def _left_padded(rows: list[torch.Tensor], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(rows), total, dtype=torch.long)
    mask = torch.zeros(len(rows), total, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, total - r.numel():] = r
        mask[i, total - r.numel():] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("name", PAD_ARCHS)
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_left_padding(models, name, density):
    bs = 16
    cfg = SketchWalkConfig(density=density, dense_below=0, dense_layers=0, block_size=bs)
    model = flexwalk.configure(models(name, "sketchwalk_flex"), cfg)
    full = random_ids(1, SEQ, seed=3)[0]
    aligned = random_ids(1, SEQ - 2 * bs, seed=4)[0]  # 2 * block_size padding tokens
    ragged = random_ids(1, SEQ - 7, seed=5)[0]  # 7 padding tokens: not block aligned
    ids, mask = _left_padded([full, aligned, ragged], SEQ)
    flexwalk.reset_counters()
    out = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
    assert flexwalk.counters().get("sparse_prefill", 0) == sum(not s for s in sliding_layers(name))
    real = mask.bool()
    assert torch.isfinite(out).all()  # padding queries included

    # Block-aligned padding: the padded row selects exactly what it selects alone (sink and
    # local blocks count from the first real token), so it matches at any budget.  Ragged
    # padding moves the block boundaries (another valid selection), so it must only match
    # at full budget; at a sparse budget it must stay finite (checked above).
    rows = [full, aligned] if density < 1.0 else [full, aligned, ragged]
    for row, seq in enumerate(rows):
        alone = model(seq[None]).logits[0]
        got = out[row, SEQ - seq.numel():]
        assert_close(got, alone, floor_tol(alone), f"{name} row {row} (density {density}) padded vs alone")

    # and the padded batch under eager attention agrees at full budget
    if density == 1.0:
        ref = models(name, "eager")(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        assert_close(out[real], ref[real], floor_tol(ref[real]))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_left_padded_generate_matches_eager(models, name):
    rows = [random_ids(1, SEQ, seed=6)[0], random_ids(1, SEQ - 16, seed=7)[0], random_ids(1, SEQ - 5, seed=8)[0]]
    ids, mask = _left_padded(rows, SEQ)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = models(name, "eager").generate(ids, attention_mask=mask, **gen)
    model = flexwalk.configure(models(name, "sketchwalk_flex"), full_cfg(name))
    out = model.generate(ids, attention_mask=mask, **gen)
    assert torch.equal(out, ref), f"{out[:, SEQ:].tolist()} != {ref[:, SEQ:].tolist()}"


def test_gemma2_softcap_reaches_the_kernel(models):
    """Gemma 2's attention logit soft-capping is applied in the sparse (flex) layers."""
    ids = random_ids(BATCH, SEQ, seed=21)
    capped = flexwalk.configure(models("gemma2", "sketchwalk_flex"), full_cfg("gemma2"))

    def no_cap():
        cfg = ARCHS["gemma2"].config()
        cfg.attn_logit_softcapping = None
        return cfg

    uncapped = flexwalk.configure(build_model("gemma2", "sketchwalk_flex", config=no_cap()), full_cfg("gemma2"))
    uncapped_eager = build_model("gemma2", "eager", config=no_cap())
    a, b = capped(ids).logits, uncapped(ids).logits
    assert max_err(a, b) > 1e-3  # the cap (5.0) really bites on these logits
    assert_close(b, uncapped_eager(ids).logits, floor_tol(b), "gemma2 without softcap vs eager")
    assert_close(a, models("gemma2", "eager")(ids).logits, floor_tol(a), "gemma2 with softcap vs eager")


# --------------------------------------------------------------------------- GQA 9 / 3
def _expand_kv_heads(gqa_model, mha_model, n_rep: int, head_dim: int) -> None:
    """Load the GQA model's weights into an MHA model, each K/V head repeated n_rep times."""
    sd = dict(gqa_model.state_dict())
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[k]
            sd[k] = w.reshape(-1, head_dim, w.shape[-1]).repeat_interleave(n_rep, 0).reshape(-1, w.shape[-1])
    mha_model.load_state_dict(sd)


def test_gqa_9_query_3_kv_heads(models):
    name = "smollm2"
    gqa = models(name, "sketchwalk_flex")
    assert (gqa.config.num_attention_heads, gqa.config.num_key_value_heads) == (9, 3)
    seen = []

    def spy(module, q, k, v, *args, **kwargs):  # sketchwalk_flex's attention function, watched
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return fw_tf.sketchwalk_flex_attention(module, q, k, v, *args, **kwargs)

    ids = random_ids(BATCH, SEQ, seed=9)

    # full budget: equals eager; q, k, v reach the attention function with 9 / 3 / 3 heads
    ref, tol = reference_logits(models, name, ids)
    transformers.AttentionInterface.register(fw_tf.ATTN_IMPLEMENTATION, spy)
    try:
        out = flexwalk.configure(gqa, SPARSE.replace(density=1.0))(ids).logits
    finally:
        fw_tf.register()
    assert_close(out, ref, tol)
    assert seen and set(seen) == {(9, 3, 3)}, seen

    # sparse budget: the same model with K/V heads materialised (9/9 MHA) selects and attends
    # identically, so GQA broadcasting in the selection and in flex is right
    cfg9 = gqa.config.__class__.from_dict({**gqa.config.to_dict(), "num_key_value_heads": 9})
    mha = AutoModelForCausalLM.from_config(cfg9, attn_implementation="sketchwalk_flex").eval()
    _expand_kv_heads(gqa, mha, 3, gqa.config.head_dim)
    for scoring in ("mean", "per_head"):
        cfg = SPARSE.replace(head_scoring=scoring)
        a = flexwalk.configure(gqa, cfg)(ids).logits
        b = flexwalk.configure(mha, cfg)(ids).logits
        assert_close(a, b, floor_tol(b), str(scoring))
        assert max_err(a, ref) > 1e-3  # really sparse


# --------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(models, dtype):
    name = "llama"
    ids = random_ids(BATCH, SEQ, seed=10)
    ref32 = models(name, "eager")(ids).logits
    ref_low = models(name, "eager", dtype)(ids).logits
    own_err = max_err(ref_low, ref32)
    assert own_err > 0  # the dtype really is lower precision
    model = flexwalk.configure(models(name, "sketchwalk_flex", dtype), full_cfg(name))
    flexwalk.reset_counters()
    out = model(ids).logits
    assert out.dtype == dtype
    assert flexwalk.counters() == expected_counters(name, full_cfg(name))
    assert torch.isfinite(out).all()
    err = max_err(out, ref32)
    assert err <= 3.0 * own_err, f"{dtype}: |sketchwalk - eager fp32| {err:.3g} > 3 x own error {own_err:.3g}"
    # sparse budget stays finite in low precision too
    out = flexwalk.configure(model, SPARSE)(ids).logits
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- per-model configs
def test_two_models_do_not_interfere():
    cfg_a = SketchWalkConfig(density=0.3, dense_below=0, dense_layers=0, block_size=16)
    cfg_b = SketchWalkConfig(density=0.5, dense_below=0, dense_layers=1, block_size=16, sink_blocks=0, local_blocks=2)
    shared_config = ARCHS["llama"].config()  # both models built from ONE config object
    a = flexwalk.configure(build_model("llama", "sketchwalk_flex", config=shared_config), cfg_a)
    b = flexwalk.configure(build_model("llama", "sketchwalk_flex", config=shared_config), cfg_b)
    ids = random_ids(BATCH, SEQ, seed=11)
    alone_a = a(ids).logits
    alone_b = b(ids).logits
    assert max_err(alone_a, alone_b) > 1e-3  # the two configs really differ
    for _ in range(2):
        assert torch.equal(a(ids).logits, alone_a)
        assert torch.equal(b(ids).logits, alone_b)
    assert resolve_config(a.model.layers[1].self_attn) == cfg_a
    assert resolve_config(b.model.layers[1].self_attn) == cfg_b
    # a fresh model built alone with cfg_b gives the same as b
    c = flexwalk.configure(build_model("llama", "sketchwalk_flex"), cfg_b)
    assert torch.equal(c(ids).logits, alone_b)


def test_set_attn_implementation_round_trip(models):
    name = "llama"
    ids = random_ids(BATCH, SEQ, seed=12)
    ref, tol = reference_logits(models, name, ids)
    model = build_model(name, "sketchwalk_flex")
    flexwalk.configure(model, SPARSE)
    sparse = model(ids).logits
    assert max_err(sparse, ref) > 1e-3

    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    flexwalk.reset_counters()
    assert_close(model(ids).logits, ref, tol)
    assert flexwalk.counters() == {}  # flexwalk not called at all

    model.set_attn_implementation("sketchwalk_flex")
    flexwalk.reset_counters()
    again = model(ids).logits
    assert flexwalk.counters() == {"sparse_prefill": 2}
    assert torch.equal(again, sparse)  # the per-model config survived the round trip

    flexwalk.configure(model, full_cfg(name))
    assert_close(model(ids).logits, ref, tol)


# --------------------------------------------------------------------------- config from the model config
def test_from_config_and_config_attribute(models):
    name = "llama"
    ids = random_ids(BATCH, SEQ, seed=13)
    ref, tol = reference_logits(models, name, ids)

    cfg = ARCHS[name].config()
    cfg.sketchwalk_config = {"density": 1.0, "dense_below": 0, "dense_layers": 0, "block_size": 16}
    torch.manual_seed(1234)
    model = build_model(name, "sketchwalk_flex", config=cfg)  # AutoModelForCausalLM.from_config
    assert model.config._attn_implementation == "sketchwalk_flex"
    flexwalk.reset_counters()
    assert_close(model(ids).logits, ref, tol)
    assert flexwalk.counters() == {"sparse_prefill": 2}

    # a sparse dict on the config gives exactly what configure() with the same settings gives
    sparse_dict = SPARSE.to_dict()
    model.config.sketchwalk_config = sparse_dict
    via_dict = model(ids).logits
    assert all(v < 1.0 for v in flexwalk.density_report().values())
    configured = flexwalk.configure(build_model(name, "sketchwalk_flex"), SPARSE)
    assert torch.equal(via_dict, configured(ids).logits)

    # a preset name
    model.config.sketchwalk_config = "speed"
    assert resolve_config(model.model.layers[0].self_attn) == PRESETS["speed"]
    flexwalk.reset_counters()
    out = model(ids).logits  # 100 tokens < dense_below: dense, hence equal to eager
    assert flexwalk.counters() == {"dense_layer": 2}
    assert_close(out, ref, tol)

    # configure() wins over the config attribute
    flexwalk.configure(model, SPARSE)
    assert resolve_config(model.model.layers[0].self_attn) == SPARSE


def test_auto_from_config_direct(models):
    cfg = ARCHS["qwen3"].config()
    cfg.sketchwalk_config = {"density": 1.0, "dense_below": 0, "dense_layers": 0, "block_size": 16}
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sketchwalk_flex").eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    ref = models("qwen3", "eager")
    model.load_state_dict(ref.state_dict())
    ids = random_ids(BATCH, SEQ, seed=14)
    want, tol = reference_logits(models, "qwen3", ids)
    flexwalk.reset_counters()
    assert_close(model(ids).logits, want, tol)
    assert flexwalk.counters() == {"sparse_prefill": 2}


def test_from_pretrained_sketchwalk_config_kwarg(models, tmp_path):
    name = "llama"
    models(name, "eager").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="sketchwalk_flex", sketchwalk_config=SPARSE.to_dict()
    ).eval()
    assert resolve_config(model.model.layers[0].self_attn) == SPARSE
    ids = random_ids(BATCH, SEQ, seed=15)
    want = flexwalk.configure(models(name, "sketchwalk_flex"), SPARSE)(ids).logits
    assert torch.equal(model(ids).logits, want)


def test_config_object_survives_save_pretrained(models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        _saved(models, tmp_path), attn_implementation="sketchwalk_flex", sketchwalk_config=SPARSE
    ).eval()
    ids = random_ids(1, SEQ, seed=16)
    model(ids)  # first forward stores the config as a plain dict
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="sketchwalk_flex")
    assert resolve_config(again.model.layers[0].self_attn) == SPARSE


def _saved(models, tmp_path):
    path = tmp_path / "llama"
    models("llama", "eager").save_pretrained(path)
    return path


# --------------------------------------------------------------------------- unsupported features
def test_output_attentions_refused(models):
    model = flexwalk.configure(models("llama", "sketchwalk_flex"), full_cfg("llama"))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(random_ids(1, SEQ), output_attentions=True)


def test_attention_sinks_refused():
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=32, max_position_embeddings=512, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sketchwalk_flex").eval()
    flexwalk.configure(model, full_cfg("llama"))
    with pytest.raises(NotImplementedError, match="attention sinks"):
        model(random_ids(1, SEQ))


def test_bidirectional_gemma3_refused():
    cfg = ARCHS["gemma3"].config()
    cfg.use_bidirectional_attention = True
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM._from_config(cfg, attn_implementation="sketchwalk_flex").eval()
    flexwalk.configure(model, full_cfg("gemma3"))
    with pytest.raises(NotImplementedError, match="bidirectional"):
        model(random_ids(1, SEQ))


def test_encoder_bert_refused():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(cfg, attn_implementation="sketchwalk_flex").eval()
    with pytest.raises(NotImplementedError, match="bidirectional"):
        model(random_ids(1, SEQ))


def test_encoder_decoder_refused():
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=4
    )
    model = transformers.T5ForConditionalGeneration(cfg)
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        flexwalk.configure(model, full_cfg("llama"))


def test_training_dropout_refused():
    cfg = ARCHS["llama"].config()
    cfg.attention_dropout = 0.1
    model = flexwalk.configure(build_model("llama", "sketchwalk_flex", config=cfg), full_cfg("llama"))
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(random_ids(1, SEQ))


# --------------------------------------------------------------------------- static cache
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_static_cache_generate(models, name):
    ids = random_ids(BATCH, SEQ, seed=16)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, cache_implementation="static")
    ref = models(name, "sdpa").generate(ids, **gen)
    model = flexwalk.configure(models(name, "sketchwalk_flex"), full_cfg(name))
    flexwalk.reset_counters()
    out = model.generate(ids, **gen)
    assert torch.equal(out, ref), f"{out[:, SEQ:].tolist()} != {ref[:, SEQ:].tolist()}"
    want = expected_counters(name, full_cfg(name))
    want["dense_decode"] = (NEW_TOKENS - 1) * len(sliding_layers(name))
    assert flexwalk.counters() == want


# --------------------------------------------------------------------------- cached prefix
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_cached_prefix_continuation(models, name):
    """A multi-token forward after a cached prefix (chunked prefill) equals the full forward."""
    ids = random_ids(BATCH, SEQ + 40, seed=18)
    ref = models(name, "eager")(ids).logits[:, SEQ:]
    model = flexwalk.configure(models(name, "sketchwalk_flex"), full_cfg(name).replace(density=0.3))
    cache = transformers.DynamicCache(config=model.config)
    model(ids[:, :SEQ], **cache_kwargs(cache), use_cache=True)
    flexwalk.reset_counters()
    out = model(ids[:, SEQ:], **cache_kwargs(cache), use_cache=True).logits
    assert flexwalk.counters() == {"dense_cached_prefill": len(sliding_layers(name))}
    # the prefix was prefilled sparsely, so compare the continuation against dense only at
    # full budget; at 0.3 check it runs and stays finite
    assert torch.isfinite(out).all()
    flexwalk.configure(model, full_cfg(name))
    cache = transformers.DynamicCache(config=model.config)
    model(ids[:, :SEQ], **cache_kwargs(cache), use_cache=True)
    out = model(ids[:, SEQ:], **cache_kwargs(cache), use_cache=True).logits
    assert_close(out, ref, floor_tol(ref))


def test_padding_mask_with_holes(models):
    """A mask with holes (a masked span inside a row) is followed exactly: in a prefill, and on a
    continuation of a cached prefix (prefix prefilled by eager)."""
    ids = random_ids(BATCH, SEQ + 40, seed=20)
    mask = torch.ones(BATCH, SEQ + 40, dtype=torch.long)
    mask[1, 10:20] = 0
    model = flexwalk.configure(models("llama", "sketchwalk_flex"), full_cfg("llama"))
    real = mask[:, :SEQ].bool()
    ref = models("llama", "eager")(ids[:, :SEQ], attention_mask=mask[:, :SEQ]).logits
    out = model(ids[:, :SEQ], attention_mask=mask[:, :SEQ]).logits
    assert_close(out[real], ref[real], floor_tol(ref), "prefill with a holed padding mask vs eager")

    ref = models("llama", "eager")(ids, attention_mask=mask).logits[:, SEQ:]
    cache = transformers.DynamicCache(config=model.config)
    models("llama", "eager")(ids[:, :SEQ], attention_mask=mask[:, :SEQ], **cache_kwargs(cache), use_cache=True)
    out = model(ids[:, SEQ:], attention_mask=mask, **cache_kwargs(cache), use_cache=True).logits
    assert_close(out, ref, floor_tol(ref), "continuation with a holed padding mask vs eager")


# --------------------------------------------------------------------------- compile robustness
def test_compiled_flex_survives_shape_changes(models):
    """One process sees several batch sizes and padded lengths (ordinary serving traffic).

    Shape changes make dynamo recompile the shared compiled flex_attention with dynamic
    shapes; each call must still run and match eager at full budget.
    """
    name = "llama"
    model = flexwalk.configure(models(name, "sketchwalk_flex"), full_cfg(name))
    eager = models(name, "eager")
    calls = [(2, SEQ, 0), (3, SEQ, 0), (1, SEQ - 30, 0), (2, SEQ, 32), (2, SEQ - 10, 32), (3, SEQ + 20, 7)]
    failures = []
    for batch, length, pad in calls:
        ids = random_ids(batch, length, seed=19)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, :pad] = 0
        kw = dict(attention_mask=mask, position_ids=_positions(mask))
        try:
            out = model(ids, **kw).logits
        except Exception as e:  # noqa: BLE001 - collect every failing shape, then fail once
            first = next((ln for ln in str(e).splitlines() if "error:" in ln), str(e)[:200])
            failures.append(f"batch={batch} len={length} pad={pad}: {type(e).__name__}: {first}")
            continue
        ref = eager(ids, **kw).logits
        real = mask.bool()
        err = max_err(out[real], ref[real])
        if err > floor_tol(ref):
            failures.append(f"batch={batch} len={length} pad={pad}: max err vs eager {err:.3g}")
    assert not failures, "\n".join(failures)


def test_second_block_size_in_one_process(models):
    """Two block sizes in one process (e.g. two models with different SketchWalkConfigs).

    The second block size makes dynamo recompile the shared compiled flex_attention; on CPU
    that compile fails (C++ error), see the report.
    """
    name = "llama"
    ids = random_ids(BATCH, SEQ, seed=17)
    ref, tol = reference_logits(models, name, ids)
    model = models(name, "sketchwalk_flex")
    for bs in (16, 32):
        cfg = SketchWalkConfig(density=1.0, dense_below=0, dense_layers=0, block_size=bs)
        flexwalk.reset_counters()
        out = flexwalk.configure(model, cfg)(ids).logits
        assert flexwalk.counters() == {"sparse_prefill": 2}
        assert_close(out, ref, tol, f"block_size={bs}")
        sparse = flexwalk.configure(model, cfg.replace(density=0.3))(ids).logits
        assert torch.isfinite(sparse).all()


# --------------------------------------------------------------------------- direct calls
def test_attention_function_without_a_mask_is_plain_causal(models):
    """A model that builds no mask still gets causal attention (queries = the last L keys)."""
    module = models("llama", "sketchwalk_flex").model.layers[1].self_attn
    flexwalk.configure(models("llama", "sketchwalk_flex"), SketchWalkConfig(density=1.0, dense_below=0, block_size=16,
                                                                          dense_layers=0))
    g = torch.Generator().manual_seed(3)
    hq, hkv = module.config.num_attention_heads, module.config.num_key_value_heads
    d = module.head_dim
    q, k, v = (torch.randn(1, h, SEQ, d, generator=g) for h in (hq, hkv, hkv))
    flexwalk.reset_counters()
    out, weights = fw_tf.sketchwalk_flex_attention(module, q, k, v, None, scaling=d**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert weights is None and out.shape == (1, SEQ, hq, d)
    assert_close(out, ref.transpose(1, 2), floor_tol(ref), "no-mask call")
    assert flexwalk.counters() == {"sparse_prefill": 1}
    # a continuation of L queries after a cached prefix: causal with offset S - L
    out2, _ = fw_tf.sketchwalk_flex_attention(module, q[:, :, -40:], k, v, None, scaling=d**-0.5)
    assert_close(out2, ref.transpose(1, 2)[:, -40:], floor_tol(ref), "no-mask continuation")


def test_dict_config_is_validated_once_and_errors_still_raise():
    a = coerce_config({"density": 0.3, "block_size": 32})
    assert a == SketchWalkConfig(density=0.3, block_size=32)
    assert coerce_config({"block_size": 32, "density": 0.3}) is a  # cached, key order irrelevant
    with pytest.raises(ValueError, match=r"SketchWalkConfig.block_size=48"):
        coerce_config({"block_size": 48})
    with pytest.raises(ValueError, match="unknown field"):
        coerce_config({"blocksize": 64})
    with pytest.raises(ValueError, match="config=3"):
        coerce_config(3)


def test_head_sharded_attention_refused():
    """Under tensor parallelism a rank sees a share of the heads: refused, never silently a
    per-rank selection (the functional API's process_group handles it; tests/test_tensor_parallel.py)."""
    from flexwalk.integrations.transformers import sketchwalk_flex_attention

    model = build_model("llama", "sketchwalk_flex")
    attn = model.model.layers[0].self_attn
    heads = model.config.num_attention_heads
    q = torch.randn(1, heads // 2, SEQ, 16)
    k = v = torch.randn(1, max(1, model.config.num_key_value_heads // 2), SEQ, 16)
    with pytest.raises(NotImplementedError, match=f"tensor parallelism.*{heads // 2} of {heads}"):
        sketchwalk_flex_attention(attn, q, k, v, None)


def test_pooled_query_blocks_through_the_model(models):
    """query_block_size=32 over 16-token key blocks through transformers (llama): every sparse
    layer keeps the predicted (pooled) density, a row left-padded by one whole kernel query
    block computes what it computes alone, the full budget equals eager, and sparse decode
    (which keeps block_size) runs after such a prefill."""
    cfg = SPARSE.replace(query_block_size=32)
    model = flexwalk.configure(models("llama", "sketchwalk_flex"), cfg)
    ids = random_ids(1, SEQ, seed=1)
    flexwalk.reset_counters()
    out = model(ids).logits
    want = flexwalk.expected_density(cfg, SEQ)
    assert want != flexwalk.expected_density(SPARSE, SEQ)  # the pooled budget is another one
    report = flexwalk.density_report()
    assert report and all(d == pytest.approx(want, abs=1e-6) for d in report.values()), (report, want)
    assert torch.isfinite(out).all()
    row = random_ids(1, SEQ - 32, seed=4)[0]
    ids2, mask = _left_padded([ids[0], row], SEQ)
    padded = model(ids2, attention_mask=mask, position_ids=_positions(mask)).logits
    alone = model(row[None]).logits[0]
    assert_close(padded[1, 32:], alone, floor_tol(alone), "row padded by one kernel query block vs alone")
    ref, tol = reference_logits(models, "llama", ids)
    assert_close(flexwalk.configure(model, cfg.replace(density=1.0))(ids).logits, ref, tol, "full budget vs eager")
    flexwalk.configure(model, cfg.replace(skip_decode=False, decode_dense_steps=0))
    flexwalk.reset_counters()
    gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, SEQ + NEW_TOKENS) and torch.equal(gen[:, :SEQ], ids)
    assert flexwalk.counters()["sparse_decode"] == (NEW_TOKENS - 1) * len(sliding_layers("llama"))
