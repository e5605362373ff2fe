"""Every mask SDPA accepts: padding with holes, packed sequences, 4D masks and custom mask functions.

Functional API: a padding mask with holes equals the eager oracle at a sparse budget and SDPA
(a dense token mask) at full budget, residual included.  Through transformers: prompts that
contain the pad id (generate() then infers a mask with holes) on nine architectures, packed
documents (position ids restarting, no padding mask), a 4D mask and a custom mask function,
each against eager or sdpa attention under the same mask.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import pytest
import torch
import transformers
from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk.kernels.dense import masked_attention
from flexwalk.integrations import transformers as fw_tf
from flexwalk.integrations.cache_kwarg import cache_kwargs
from flexwalk.reference import eager_sketchwalk_attention, reference_attention, reference_error_budget, token_mask
from flexwalk.selection.driver import sketchwalk_selection

sys.path.insert(0, os.path.dirname(__file__))
from conftest import floor_tol, random_qkv  # noqa: E402
from tiny_models import ARCHS, VOCAB, build_model, random_ids  # noqa: E402

BS = 16
SPARSE = SketchWalkConfig(density=0.3, dense_below=0, dense_layers=0, block_size=BS)
FULL = SketchWalkConfig(density=1.0, dense_below=0, dense_layers=0, block_size=BS)


@pytest.fixture(autouse=True)
def _no_grad():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def holed_validity(batch: int, n: int) -> torch.Tensor:
    """Row 0: two holes, one of them covering whole blocks; row 1: left padding and a one-token
    hole; row 2 (batch 3): every token padding."""
    kv = torch.ones(batch, n, dtype=torch.bool)
    kv[0, 40:90] = False  # blocks 3-4 hold no real token
    kv[0, 200:213] = False
    kv[1, :7] = False
    kv[1, 150] = False
    if batch > 2:
        kv[2] = False
    return kv


# --------------------------------------------------------------------------- functional API
@pytest.mark.parametrize("residual", [False, True])
def test_holes_equal_the_oracle_and_sdpa(residual):
    n = 300
    q, k, v = random_qkv(3, 4, 2, n, 16, seed=1)
    kv = holed_validity(3, n)
    for cfg in (SPARSE, FULL):
        cfg = cfg.replace(residual=residual)
        flexwalk.reset_counters()
        out, _ = flexwalk.sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
        assert flexwalk.counters() == {"padding_holes": 1, "sparse_prefill": 1, **({"residual": 1} if residual else {})}
        assert torch.isfinite(out).all()  # padding queries and the all-padding row included
        ref, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
        if residual:  # the oracle appends the summaries: same fp32 function, computed apart
            assert (out - ref).abs().max().item() <= floor_tol(ref)
            continue
        # at a sparse budget the oracle's token mask; at full budget SDPA under the padding mask
        # alone, on the real queries (what a padding query attends is not SDPA's business)
        mask = token_mask(n, selection=sel, key_valid=kv) if cfg.density < 1 else token_mask(n, batch=3, key_valid=kv)
        real = kv[:, None, :, None]
        err, allowed = reference_error_budget(q, k, v, mask, torch.where(real, out, reference_attention(q, k, v, mask)))
        assert err <= allowed, f"density {cfg.density}: {err:.3g} > {allowed:.3g}"


def test_a_block_without_a_real_token_is_never_chosen():
    q, k, v = random_qkv(2, 4, 2, 300, 16, seed=2)
    kv = holed_validity(2, 300)
    sel, _ = sketchwalk_selection(q, k, SPARSE.replace(sink_blocks=0), 0, key_valid=kv)
    assert not sel.mask[0, :, 3:5][5:].any()  # blocks 3 and 4 of row 0 (48..95) hold padding only
    # the same mask at full budget keeps them out too: full budget means every real block
    sel, _ = sketchwalk_selection(q, k, FULL, 0, key_valid=kv)
    assert not sel.mask[0, 6:, 3:5].any() and sel.mask[0, 6:, 5].all()


def test_holes_known_by_the_caller_skip_the_check():
    q, k, v = random_qkv(2, 4, 2, 300, 16, seed=3)
    kv = holed_validity(2, 300)
    a, _ = flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0, key_valid=kv)
    b, _ = flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0, key_valid=kv, holes=True)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- through transformers
@functools.lru_cache(maxsize=None)
def _model(name: str, attn: str):
    return build_model(name, attn)


def _sketchwalk(name: str, cfg: SketchWalkConfig):
    return flexwalk.configure(_model(name, "sketchwalk_flex"), cfg)


NINE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite", "starcoder2", "gemma2"]
PROMPT = 160  # ten blocks of 16, past SMALL_QUERY


def _prompt_with_pad_ids(seed: int) -> torch.Tensor:
    """Ids drawn from the whole vocabulary, the pad id (0) at a few places inside the prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (PROMPT,), generator=g)
    ids[[17, 18, 60, 61, 62, 63, 100]] = 0
    return ids


@pytest.mark.parametrize("name", NINE)
def test_generate_with_pad_ids_in_the_prompt(name):
    """generate() infers a padding mask with holes from prompts holding the pad id: sparse, it runs
    and a block-aligned left-padded row equals the row alone (with position ids from the mask, as
    generate() sets them); at full budget the tokens equal
    eager attention's under the same inferred mask."""
    solo = _prompt_with_pad_ids(1)
    other = torch.cat([torch.full((2 * BS,), 7), _prompt_with_pad_ids(2)[2 * BS:]])
    ids = torch.stack([other, torch.cat([torch.zeros(2 * BS, dtype=torch.long), solo[2 * BS:]])])
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    model = _sketchwalk(name, SPARSE)
    flexwalk.reset_counters()
    out = model.generate(ids, **gen)
    if not all(ARCHS[name].layer_is_sliding()):  # mistral's layers all keep their window (dense)
        assert flexwalk.counters().get("padding_holes", 0) > 0
    alone = model.generate(solo[None, 2 * BS:], **gen)
    assert torch.equal(out[1, ids.shape[1]:], alone[0, PROMPT - 2 * BS:])
    inferred = (ids != 0).long()  # the mask generate() infers, and its position ids: the key extremes
    positions = (inferred.cumsum(-1) - 1).clamp_min(0)  # depend on RoPE's absolute phase, block means do not
    logits = model(ids, attention_mask=inferred, position_ids=positions).logits
    logits_alone = model(solo[None, 2 * BS:], attention_mask=inferred[1:, 2 * BS:],
                         position_ids=(inferred[1:, 2 * BS:].cumsum(-1) - 1).clamp_min(0)).logits
    real = solo[2 * BS:] != 0
    ref = logits_alone[0][real]
    got = logits[1, 2 * BS:][real]
    assert (got - ref).abs().max().item() <= floor_tol(ref)

    model = _sketchwalk(name, FULL)
    ref = _model(name, "eager").generate(ids, **gen)
    assert torch.equal(model.generate(ids, **gen), ref)


def test_holes_turn_sparse_decode_off_for_that_prompt(caplog):
    ids = _prompt_with_pad_ids(3)[None]
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    model = _sketchwalk("llama", FULL.replace(skip_decode=False))
    flexwalk.reset_counters()
    with caplog.at_level(logging.WARNING, logger="flexwalk"):
        out = model.generate(ids, **gen)
    c = flexwalk.counters()
    assert "sparse_decode" not in c and c.get("dense_decode_no_state", 0) > 0
    assert not fw_tf.decode_states(model)
    assert torch.equal(out, _model("llama", "eager").generate(ids, **gen))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_packed_documents_each_run_alone(name):
    """Padding-free inputs: three documents in one row, position ids restarting.  They go through
    the varlen path, one call per layer; each document equals its own run (sparse: selected on its
    own; the 25-token one below dense_below: dense) and, at full budget, sdpa's packed output."""
    lengths = [70, 25, 85]
    ids = random_ids(1, sum(lengths), seed=9)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cfg = SPARSE.replace(dense_below=40)
    model = _sketchwalk(name, cfg)
    flexwalk.reset_counters()
    out = model(ids, position_ids=pos, use_cache=False).logits
    c = flexwalk.counters()
    layers = model.config.num_hidden_layers
    assert c["packed_sequences"] == c["varlen_prefill"] == layers
    if name == "llama":
        assert c == {"packed_sequences": layers, "varlen_prefill": layers, "sparse_prefill": 2 * layers,
                     "dense_short": layers}
    start = 0
    for n in lengths:
        alone = model(ids[:, start:start + n], use_cache=False).logits
        got = out[:, start:start + n]
        assert (got - alone).abs().max().item() <= floor_tol(alone)
        start += n
    model = _sketchwalk(name, FULL)
    got = model(ids, position_ids=pos, use_cache=False).logits
    ref = _model(name, "sdpa")(ids, position_ids=pos, use_cache=False).logits
    assert (got - ref).abs().max().item() <= 4 * floor_tol(ref)


def test_flattening_collator_batches_run_per_document():
    """transformers' DataCollatorWithFlattening (its padding-free batches: one row, position ids
    restarting; with return_flash_attn_kwargs the attention function also receives cu_seq_lens_q
    / _k and max_length_q / _k, which flexwalk does not need: the mask function's documents are
    the same boundaries).  Each document equals its solo run, and at full budget sdpa's output on
    the same batch, in two rows of packed documents too."""
    docs = [random_ids(1, n, seed=20 + n)[0].tolist() for n in (60, 30, 90, 45)]
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collate([{"input_ids": d} for d in docs])
    assert batch["cu_seq_lens_q"].tolist() == [0, 60, 90, 180, 225] and batch["max_length_q"] == 90
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = _sketchwalk("llama", SPARSE.replace(dense_below=40))
    flexwalk.reset_counters()
    out = model(**inputs, use_cache=False).logits
    assert flexwalk.counters()["varlen_prefill"] == model.config.num_hidden_layers
    start = 0
    for d in docs:
        alone = model(torch.tensor([d]), use_cache=False).logits
        got = out[:, start:start + len(d)]
        assert (got - alone).abs().max().item() <= floor_tol(alone)
        start += len(d)
    model = _sketchwalk("llama", FULL)
    two_rows = {"input_ids": inputs["input_ids"][:, :220].reshape(2, 110),
                "position_ids": torch.cat([torch.arange(60), torch.arange(30), torch.arange(20)]).expand(2, -1)}
    for kw in (inputs, two_rows):
        got = model(**kw, use_cache=False).logits
        ref = _model("llama", "sdpa")(**kw, use_cache=False).logits
        assert (got - ref).abs().max().item() <= 4 * floor_tol(ref)


@pytest.mark.parametrize("float_mask", [False, True])
def test_a_4d_mask_is_honoured(float_mask):
    n = 120
    m4 = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    m4[..., 10:20] = False
    m4[..., 50:60, 0:40] = False
    m4[..., torch.arange(n), torch.arange(n)] = True
    mask = torch.zeros(1, 1, n, n).masked_fill(~m4, float("-inf")) if float_mask else m4
    ids = random_ids(1, n, seed=11)
    flexwalk.reset_counters()
    got = _sketchwalk("llama", SPARSE)(ids, attention_mask=mask).logits
    assert flexwalk.counters() == {"custom_mask": 2}
    ref = _model("llama", "sdpa")(ids, attention_mask=mask).logits
    assert (got - ref).abs().max().item() <= 4 * floor_tol(ref)
    with pytest.raises(ValueError, match="attention_mask of shape"):
        _sketchwalk("llama", SPARSE)(ids, attention_mask=m4[..., :5])


def test_a_custom_mask_function_runs_dense_under_it():
    """A mask function that is not causal (here causal minus a band) runs exactly under
    transformers' own mask, counted; a causal one written differently still runs sparse."""
    model = _sketchwalk("llama", SPARSE)
    attn = model.model.layers[1].self_attn
    n = 100
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=12)

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < 30) | (kv_idx < 4)

    fn = and_masks(causal_mask_function, band)
    ctx = fw_tf.sketchwalk_mask_function(2, n, n, mask_function=fn)
    flexwalk.reset_counters()
    out, _ = fw_tf.sketchwalk_flex_attention(attn, q, k, v, ctx, scaling=0.25)
    assert flexwalk.counters() == {"custom_mask": 1}
    want = sdpa_mask(batch_size=2, q_length=n, kv_length=n, mask_function=fn, allow_is_causal_skip=False)
    ref = masked_attention(q, k, v, want, scale=0.25).transpose(1, 2)
    assert (out - ref).abs().max().item() <= floor_tol(ref)

    def causal_too(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    ctx = fw_tf.sketchwalk_mask_function(2, n, n, mask_function=causal_too)
    flexwalk.reset_counters()
    fw_tf.sketchwalk_flex_attention(attn, q, k, v, ctx, scaling=0.25)
    assert flexwalk.counters() == {"sparse_prefill": 1}


def test_an_unknown_mask_type_names_the_parameter():
    model = _sketchwalk("llama", SPARSE)
    attn = model.model.layers[0].self_attn
    q, k, v = random_qkv(1, 4, 2, 40, 16, seed=13)
    with pytest.raises(ValueError, match="attention_mask of type list"):
        fw_tf.sketchwalk_flex_attention(attn, q, k, v, [1, 2])


def test_transformers_packs_only_without_a_padding_mask():
    """Packed sequences are what transformers builds for a prefill without padding mask and cache
    (its create_causal_mask), the case the packed path expects."""
    cfg = _model("llama", "sdpa").config
    emb = torch.zeros(1, 30, 8)
    pos = torch.cat([torch.arange(10), torch.arange(20)])[None]
    mask = transformers.masking_utils.create_causal_mask(cfg, emb, None, position_ids=pos, **cache_kwargs(None))
    assert mask is not None and not mask[0, 0, 15, 5]  # document 2 does not see document 1
