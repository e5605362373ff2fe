"""Sparse decode through transformers: generate() with DynamicCache and StaticCache, padding,
several calls in a row, two models, stale-state detection, modes and compile stability."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
import transformers
from torch._dynamo.utils import counters as dynamo_counters

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk.integrations.cache_kwarg import cache_kwargs

sys.path.insert(0, os.path.dirname(__file__))
from conftest import FP32_FLOOR, floor_tol  # noqa: E402
from tiny_models import ARCHS, build_model, random_ids  # noqa: E402

PROMPT = 100
NEW = 12


def sparse_layers(name: str, cfg: SketchWalkConfig) -> list[int]:
    return [i for i, s in enumerate(ARCHS[name].layer_is_sliding()) if not s and i >= cfg.dense_layer_count]


def decode_cfg(density: float = 1.0, **kw) -> SketchWalkConfig:
    base = dict(block_size=16, density=density, dense_below=0, dense_layers=1, skip_decode=False, decode_dense_steps=0)
    base.update(kw)
    return SketchWalkConfig(**base)


@functools.lru_cache(maxsize=None)
def _model(name: str, attn: str):
    return build_model(name, attn)


@pytest.fixture(autouse=True)
def _isolated():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def model(name: str, cfg: SketchWalkConfig | None = None):
    m = _model(name, "sketchwalk_flex")
    flexwalk.reset_decode_state(m)
    return flexwalk.configure(m, cfg) if cfg is not None else m


def reference(name: str):
    return _model(name, "sdpa" if ARCHS[name].supports_sdpa else "eager")


def left_padded_batch(seed: int, pad: int = 9):
    ids = random_ids(2, PROMPT, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def generate(m, ids, mask=None, **kw):
    args = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    args.update(kw)
    args["min_new_tokens"] = args["max_new_tokens"]  # random weights may emit EOS: step counts stay exact
    return m.generate(ids, attention_mask=mask, **args)


def assert_same_generation(out, ref, what: str) -> None:
    assert torch.equal(out.sequences, ref.sequences), f"{what}: {out.sequences[:, PROMPT:]} != {ref.sequences[:, PROMPT:]}"
    for step, (a, b) in enumerate(zip(out.scores, ref.scores)):
        fin = torch.isfinite(b)
        err = (a[fin] - b[fin]).abs().max().item()
        tol = floor_tol(b[fin])
        assert err <= tol, f"{what}: step {step} logits differ by {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------- exactness at full budget
@pytest.mark.parametrize("name", ["llama", "smollm2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_full_budget_sparse_decode_equals_dense(name):
    """Greedy generate with sparse decode at full budget gives the sdpa tokens and logits
    (batch 2, one row left-padded), and every decode step of a sparse layer took the sparse path."""
    cfg = decode_cfg()
    ids, mask = left_padded_batch(seed=1)
    ref = generate(reference(name), ids, mask)
    m = model(name, cfg)
    flexwalk.reset_counters()
    out = generate(m, ids, mask)
    assert_same_generation(out, ref, name)
    layers = sparse_layers(name, cfg)
    assert flexwalk.counters()["sparse_decode"] == (NEW - 1) * len(layers)
    states = flexwalk.decode_states(m)
    assert sorted(states) == layers
    assert all(s.length == PROMPT + NEW - 1 for s in states.values())


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_full_budget_static_cache(name):
    cfg = decode_cfg()
    ids, mask = left_padded_batch(seed=2)
    ref = generate(reference(name), ids, mask, cache_implementation="static")
    flexwalk.reset_counters()
    out = generate(model(name, cfg), ids, mask, cache_implementation="static")
    assert_same_generation(out, ref, f"{name} static")
    counts = flexwalk.counters()
    assert counts["sparse_decode"] == (NEW - 1) * len(sparse_layers(name, cfg))
    assert "decode_stale_steps" not in counts and "decode_state_reset" not in counts


@pytest.mark.parametrize("name, cache", [("llama", "dynamic"), ("gemma2", "dynamic"), ("llama", "static")])
def test_full_budget_triton_kernel_equals_dense(name, cache):
    """The split-KV Triton decode kernel (CUDA's default; here through triton's interpreter)
    inside generate(): the sdpa tokens and logits, softcap (gemma2) and static cache included."""
    with flexwalk.options(decode_kernel="triton"):
        _full_budget_triton_kernel_equals_dense(name, cache)


def _full_budget_triton_kernel_equals_dense(name, cache):
    kw = {} if cache == "dynamic" else {"cache_implementation": "static"}
    cfg = decode_cfg()
    ids, mask = left_padded_batch(seed=3)
    ref = generate(reference(name), ids, mask, **kw)
    flexwalk.reset_counters()
    out = generate(model(name, cfg), ids, mask, **kw)
    assert_same_generation(out, ref, f"{name} {cache} triton")
    assert flexwalk.counters()["sparse_decode"] == (NEW - 1) * len(sparse_layers(name, cfg))


def test_static_cache_dense_decode_logits_match_sdpa():
    """Regression: a static cache advances its position counter in place during the forward;
    the decode mask must use the position of this step, not the advanced one."""
    ids, mask = left_padded_batch(seed=3)
    ref = generate(reference("llama"), ids, mask, cache_implementation="static")
    out = generate(model("llama", decode_cfg(skip_decode=True)), ids, mask, cache_implementation="static")
    assert_same_generation(out, ref, "static dense decode")


def test_sampling_at_full_budget_matches_sdpa():
    ids, mask = left_padded_batch(seed=4)
    torch.manual_seed(7)
    ref = generate(reference("llama"), ids, mask, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(7)
    out = generate(model("llama", decode_cfg()), ids, mask, do_sample=True, top_k=0, temperature=1.0)
    assert_same_generation(out, ref, "sampling")


# --------------------------------------------------------------------------- sparse budget
def test_sparse_decode_is_sparse_and_walks_across_layers():
    name = "llama"
    # no pins and one local block: leave the walk room to choose; the decode state carries W_l under the mean-key rule
    cfg = decode_cfg(0.25, dense_layers=0, walk="walk", decode_pinned=0.0, local_blocks=1, prefill_scoring="sketch")
    ids, mask = left_padded_batch(seed=5)
    flexwalk.reset_counters()
    out = generate(model(name, cfg), ids, mask, max_new_tokens=40)
    assert out.sequences.shape == (2, PROMPT + 40)
    scores = torch.stack(out.scores)
    eos = _model(name, "sketchwalk_flex").config.eos_token_id
    assert torch.isfinite(scores[..., torch.arange(scores.shape[-1]) != eos]).all()  # EOS is held back
    counts = flexwalk.counters()
    assert counts["sparse_decode"] == 39 * len(sparse_layers(name, cfg))
    report = flexwalk.density_report("decode")
    assert sorted(report) == sparse_layers(name, cfg)
    assert all(0 < d < 0.5 for d in report.values()), report
    # the walk changes the selection: one-hop at the same budget decodes differently
    one_hop = generate(model(name, cfg.replace(walk="one_hop")), ids, mask, max_new_tokens=40)
    assert any(not torch.equal(a, b) for a, b in zip(out.scores, one_hop.scores))


def test_the_default_first_four_decode_steps_are_dense_and_the_rest_select():
    """decode_dense_steps at its default (4): through generate(), every sparse layer runs its first
    four steps dense (counted) and selects from the fifth; the dense steps' logits equal dense
    decode's after the same sparse prefill, a selecting step's differ."""
    name = "llama"
    cfg = decode_cfg(0.25, dense_layers=0, decode_pinned=0.0, decode_dense_steps=SketchWalkConfig().decode_dense_steps)
    assert cfg.decode_dense_steps == 4
    ids, mask = left_padded_batch(seed=5)
    flexwalk.reset_counters()
    out = generate(model(name, cfg), ids, mask, max_new_tokens=NEW)
    counts, layers = flexwalk.counters(), len(sparse_layers(name, cfg))
    # sparse_decode counts every step of the sparse path; dense_decode_first the dense ones among them
    assert counts["sparse_decode"] == (NEW - 1) * layers and counts["dense_decode_first"] == 4 * layers
    dense = generate(model(name, cfg.replace(skip_decode=True)), ids, mask, max_new_tokens=NEW)
    assert torch.equal(out.sequences[:, : PROMPT + 5], dense.sequences[:, : PROMPT + 5])
    for step in range(1, 5):  # scores[0] is the prefill's; scores[1:5] the dense decode steps'
        fin = torch.isfinite(dense.scores[step])
        err = (out.scores[step][fin] - dense.scores[step][fin]).abs().max().item()
        assert err <= floor_tol(dense.scores[step][fin]), f"dense first step {step}: logits differ by {err:.3g}"
    assert any(not torch.allclose(a, b) for a, b in zip(out.scores[5:], dense.scores[5:]))


def test_several_generate_calls_in_a_row_rebuild_the_state():
    """A second generate on the same model equals the same generate on a fresh model: the
    first call's state is never reused."""
    cfg = decode_cfg(0.3)
    first, first_mask = left_padded_batch(seed=6)
    second = random_ids(2, PROMPT, seed=7)
    m = model("llama", cfg)
    generate(m, first, first_mask)
    flexwalk.reset_counters()
    again = generate(m, second)
    counts = flexwalk.counters()
    fresh = generate(flexwalk.configure(build_model("llama", "sketchwalk_flex"), cfg), second)
    assert torch.equal(again.sequences, fresh.sequences)
    for a, b in zip(again.scores, fresh.scores):
        assert torch.equal(a, b)
    assert "decode_stale_steps" not in counts and "decode_state_reset" not in counts


def test_two_models_interleaved_step_by_step():
    cfg_a = decode_cfg(0.3)
    cfg_b = decode_cfg(0.5, sink_blocks=0, local_blocks=2, dense_layers=0)
    a = flexwalk.configure(build_model("llama", "sketchwalk_flex"), cfg_a)
    b = flexwalk.configure(build_model("llama", "sketchwalk_flex"), cfg_b)
    ids_a, ids_b = random_ids(1, PROMPT, seed=8), random_ids(1, PROMPT + 7, seed=9)

    def run(models_and_ids, steps=10):
        caches = [transformers.DynamicCache(config=m.config) for m, _ in models_and_ids]
        toks = [ids for _, ids in models_and_ids]
        logits = [[] for _ in models_and_ids]
        for i, (m, ids) in enumerate(models_and_ids):
            out = m(ids, **cache_kwargs(caches[i]), use_cache=True).logits[:, -1]
            logits[i].append(out)
            toks[i] = out.argmax(-1, keepdim=True)
        for _ in range(steps):
            for i, (m, _) in enumerate(models_and_ids):
                out = m(toks[i], **cache_kwargs(caches[i]), use_cache=True).logits[:, -1]
                logits[i].append(out)
                toks[i] = out.argmax(-1, keepdim=True)
        return logits

    together = run([(a, ids_a), (b, ids_b)])
    alone_a = run([(a, ids_a)])[0]
    alone_b = run([(b, ids_b)])[0]
    for x, y in zip(together[0], alone_a):
        assert torch.equal(x, y)
    for x, y in zip(together[1], alone_b):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- stale state, reset API
def _prefill(m, ids):
    cache = transformers.DynamicCache(config=m.config)
    logits = m(ids, **cache_kwargs(cache), use_cache=True).logits
    return cache, logits[:, -1].argmax(-1, keepdim=True)


def _dense_next_logits(ids, tok):
    ref = reference("llama")
    cache = transformers.DynamicCache(config=ref.config)
    ref(ids, **cache_kwargs(cache), use_cache=True)
    return ref(tok, **cache_kwargs(cache), use_cache=True).logits


def test_stale_state_is_detected_and_decodes_densely():
    cfg = decode_cfg(0.2)
    layers = len(sparse_layers("llama", cfg))
    m = model("llama", cfg)
    ids_a, ids_b, ids_c = random_ids(1, PROMPT, seed=10), random_ids(1, PROMPT, seed=11), random_ids(1, 90, seed=12)
    cache_a, tok_a = _prefill(m, ids_a)
    _prefill(m, ids_b)  # the states now describe sequence b, of the same length as a
    flexwalk.reset_counters()
    logits = m(tok_a, **cache_kwargs(cache_a), use_cache=True).logits
    # caught on the device by the key fingerprint: exact dense attention, counted
    dense = _dense_next_logits(ids_a, tok_a)
    assert (logits - dense).abs().max().item() <= floor_tol(dense)
    assert flexwalk.counters()["decode_stale_steps"] == layers

    # a different length is caught on the host: the state is dropped, decode is dense
    cache_a, tok_a = _prefill(m, ids_a)
    _prefill(m, ids_c)
    flexwalk.reset_counters()
    logits = m(tok_a, **cache_kwargs(cache_a), use_cache=True).logits
    dense = _dense_next_logits(ids_a, tok_a)
    assert (logits - dense).abs().max().item() <= floor_tol(dense)
    assert flexwalk.counters() == {"decode_state_reset": layers, "dense_decode_no_state": layers,
                                   "dense_layer": 1}


def test_reset_api():
    cfg = decode_cfg(0.2)
    m = model("llama", cfg)
    ids = random_ids(1, PROMPT, seed=13)
    cache, tok = _prefill(m, ids)
    assert flexwalk.reset_decode_state(m) == len(sparse_layers("llama", cfg))
    assert flexwalk.decode_states(m) == {}
    flexwalk.reset_counters()
    logits = m(tok, **cache_kwargs(cache), use_cache=True).logits
    dense = _dense_next_logits(ids, tok)
    assert (logits - dense).abs().max().item() <= floor_tol(dense)
    assert flexwalk.counters()["dense_decode_no_state"] == len(sparse_layers("llama", cfg))


# --------------------------------------------------------------------------- modes
def test_prefill_only_and_decode_only_modes():
    ids = random_ids(1, PROMPT, seed=14)
    layers = len(sparse_layers("llama", decode_cfg()))
    flexwalk.reset_counters()
    generate(model("llama", decode_cfg(0.3, skip_decode=True)), ids)
    n_layers = len(ARCHS["llama"].layer_is_sliding())
    # prefill-only: every layer's decode step is dense and counted as such
    assert flexwalk.counters() == {"sparse_prefill": layers, "dense_layer": 1, "dense_decode": (NEW - 1) * n_layers}

    flexwalk.reset_counters()
    m = model("llama", decode_cfg(0.3, skip_prefill=True))
    out = generate(m, ids)
    assert flexwalk.counters() == {"dense_prefill": layers, "dense_layer": NEW, "sparse_decode": (NEW - 1) * layers}
    ref = generate(reference("llama"), ids, max_new_tokens=1)
    assert torch.allclose(out.scores[0], ref.scores[0], atol=FP32_FLOOR * 10, rtol=0)  # dense prefill


def test_decode_stays_dense_below_dense_below():
    cfg = decode_cfg(0.3, dense_below=120)
    layers = len(sparse_layers("llama", cfg))
    flexwalk.reset_counters()
    generate(model("llama", cfg), random_ids(1, PROMPT, seed=15), max_new_tokens=40)
    counts = flexwalk.counters()
    short = sum(1 for n in range(PROMPT, PROMPT + 39) if n + 1 < cfg.min_sparse_length("cpu"))
    assert counts["dense_decode_short"] == short * layers
    assert counts["sparse_decode"] == (39 - short) * layers


def test_right_padded_prefill_runs_and_decode_stays_dense():
    ids = random_ids(2, PROMPT, seed=16)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    m = model("llama", decode_cfg(0.3))
    out = m(ids, attention_mask=mask).logits
    assert torch.isfinite(out[mask.bool()]).all()
    assert flexwalk.decode_states(m) == {}


# --------------------------------------------------------------------------- compile stability
def test_generate_64_tokens_does_not_recompile_after_warmup():
    cfg = decode_cfg(0.2, dense_layers=0)
    m = model("llama", cfg)
    gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    m.generate(random_ids(1, 70, seed=17), **gen)  # warm-up: prompt and decode kernels of this bucket
    before = dynamo_counters["stats"]["unique_graphs"]
    flexwalk.reset_counters()
    m.generate(random_ids(1, 70, seed=18), **gen)
    m.generate(random_ids(1, 90, seed=19), **gen)  # another prompt length in the same bucket
    assert flexwalk.counters()["sparse_decode"] == 2 * 63 * 2
    assert dynamo_counters["stats"]["unique_graphs"] == before, "decode recompiled after warm-up"

    # a static cache reused across prompts: one compile for its size
    cache = transformers.StaticCache(config=m.config, max_cache_len=256)
    m.generate(random_ids(1, 70, seed=20), **cache_kwargs(cache), **gen)
    before = dynamo_counters["stats"]["unique_graphs"]
    cache.reset()
    m.generate(random_ids(1, 80, seed=21), **cache_kwargs(cache), **gen)
    assert dynamo_counters["stats"]["unique_graphs"] == before, "static-cache decode recompiled"


def test_generate_does_not_auto_compile_sketchwalk_models():
    """On a GPU with a static cache generate() would compile the forward with CUDA graphs,
    which breaks at our layers; the criterion is forced off for sketchwalk_flex models only,
    and a plain model gets whatever transformers' own criterion says.

    generate() hands the criterion its cache under the name the installed transformers uses
    (`cache_kwargs`: 'past_key_values' up to 5.23, 'cache' from 5.24); under the other name it
    sees no cache and never compiles, so transformers' own criterion, unwrapped, must first say
    that it would compile this very model."""
    from transformers import CompileConfig, GenerationConfig
    from transformers.generation.utils import GenerationMixin

    m = model("llama", decode_cfg())
    ref = reference("llama")
    cc = CompileConfig()
    cc._compile_all_devices = True  # what a CUDA device would allow
    gc = GenerationConfig(compile_config=cc)
    kwargs = cache_kwargs(transformers.StaticCache(config=m.config, max_cache_len=64))
    original = GenerationMixin._valid_auto_compile_criteria.__wrapped__
    assert original(m, kwargs, gc) is True, "transformers' criterion would not compile this model: the inputs miss it"
    assert m._valid_auto_compile_criteria(kwargs, gc) is False
    assert original(ref, kwargs, gc) is True
    assert ref._valid_auto_compile_criteria(kwargs, gc) is True


def test_pins_of_a_prompt_prefilled_in_chunks_equal_a_one_shot_prefill():
    """A prompt fed in two forward calls re-pins from its new last queries: the pinned blocks
    then equal those of the same prompt in one call (and differ from the first chunk's)."""
    cfg = decode_cfg(0.25, decode_pinned=0.3)
    ids = random_ids(1, PROMPT, seed=8)
    m = model("llama", cfg)
    with torch.no_grad():
        m(ids, use_cache=True)
        one_shot = {i: s.pinned.clone() for i, s in flexwalk.decode_states(m).items()}
        m = model("llama", cfg)
        cache = transformers.DynamicCache(config=m.config)
        m(ids[:, :60], **cache_kwargs(cache), use_cache=True)
        first = {i: s.pinned.clone() for i, s in flexwalk.decode_states(m).items()}
        m(ids[:, 60:], **cache_kwargs(cache), use_cache=True)
        chunked = {i: s.pinned for i, s in flexwalk.decode_states(m).items()}
    assert sorted(one_shot) == sorted(chunked) == sparse_layers("llama", cfg)
    for i in one_shot:
        n = one_shot[i].shape[1]
        assert torch.equal(chunked[i][:, :n], one_shot[i]), f"layer {i}"
        assert int(one_shot[i].sum()) == 3  # ceil(0.3 * 7 blocks)
    assert any(not torch.equal(first[i][:, :4], one_shot[i][:, :4]) or first[i].sum() != 3 for i in first)
