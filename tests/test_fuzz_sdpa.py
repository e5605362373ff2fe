"""Fuzzing the functional API against SDPA and the eager oracle.

Hypothesis draws batch 1-4, lengths 1-3000 (multiples of the block size and not), padding masks
(none, left, right, holes, and a row of padding only), GQA ratios, soft-capping, sliding windows,
one or two layers (the second walks on the first's state) and fp32 or bf16.  For every draw:

- at full budget the output equals SDPA under the same causal, window and padding mask, on every
  real query, within the dtype's reference error (SDPA run in the dtype against SDPA in float64);
- at the default density it equals the eager oracle (the same selection expanded to a dense token
  mask) within the same kind of budget;
- every output is finite, padding queries and rows of padding only included;
- each row equals the same row run alone.

One draw in ten runs flex compiled, as the library runs it; the others run it eagerly (under
torch's force_eager stance flex evaluates the same mask_mod everywhere).  Each draw is a new
shape, and a compiled flex kernel of its own costs seconds of C++ compilation on a CPU; the
compiled kernel's agreement with flex's own definition is tested over many shapes in
test_flex_vs_oracle.py.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk.reference import (eager_sketchwalk_attention, error_budget, reference_attention, reference_error_budget,
                                token_mask)


BLOCK = SketchWalkConfig().block_size
HEAD_DIM = 32
MAX_LEN = 3000
# The references build [B, Hq, n, n] float64 scores: draws keep B * Hq * n^2 under this.
MAX_SCORES = 9_100_000
EXAMPLES = 200

MASKS = ("none", "left", "right", "holes")


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    batch = draw(st.integers(1, 4))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    hq = hkv * group
    longest = min(MAX_LEN, math.isqrt(MAX_SCORES // (batch * hq)))
    n = draw(st.one_of(st.integers(1, longest), st.integers(1, longest // BLOCK).map(lambda m: m * BLOCK)))
    mask = draw(st.sampled_from(MASKS))
    key_valid = None
    if mask != "none":
        key_valid = torch.ones(batch, n, dtype=torch.bool)
        for b in range(batch):
            pad = draw(st.integers(0, n - 1))  # at least one real token
            if mask == "left":
                key_valid[b, :pad] = False
            elif mask == "right":
                key_valid[b, n - pad:] = False
            else:
                for _ in range(draw(st.integers(1, 3))):
                    at = draw(st.integers(0, n - 1))
                    key_valid[b, at:at + draw(st.integers(1, max(1, n // 3)))] = False
        if batch > 1 and draw(st.booleans()):
            key_valid[draw(st.integers(0, batch - 1))] = False  # a row of padding only
    return dict(
        dtype=dtype, batch=batch, hq=hq, hkv=hkv, n=n, key_valid=key_valid, mask=mask,
        softcap=draw(st.sampled_from([None, None, 8.0])),
        window=draw(st.one_of(st.none(), st.none(), st.integers(1, max(1, n)))),
        layers=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
        compiled=draw(st.sampled_from([False] * 9 + [True])),
    )


def layer_inputs(case, layer):
    g = torch.Generator().manual_seed(case["seed"] * 2 + layer)
    b, n = case["batch"], case["n"]
    shapes = ((b, case["hq"], n, HEAD_DIM), (b, case["hkv"], n, HEAD_DIM), (b, case["hkv"], n, HEAD_DIM))
    return [torch.randn(s, generator=g).to(case["dtype"]) for s in shapes]


def run(case, config, rows=slice(None)):
    """sketchwalk_attention over the case's layers: one output per layer."""
    kv = None if case["key_valid"] is None else case["key_valid"][rows]
    state, outs = None, []
    for layer in range(case["layers"]):
        q, k, v = (t[rows] for t in layer_inputs(case, layer))
        out, state = flexwalk.sketchwalk_attention(q, k, v, config, layer, state, key_valid=kv,
                                                   softcap=case["softcap"], window=case["window"])
        outs.append(out)
    return outs


def dense_mask(case) -> torch.Tensor:
    """[B, 1, n, n] bool: causal, the window, the padding (a padding query sees itself)."""
    return token_mask(case["n"], batch=case["batch"], key_valid=case["key_valid"], window=case["window"])


def sdpa(q, k, v, mask, softcap):
    """torch's SDPA under a bool mask (the masked reference where soft-capping is on: SDPA has none)."""
    if softcap is not None:
        return reference_attention(q, k, v, mask, softcap=softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def real_queries(case) -> torch.Tensor:
    kv = case["key_valid"]
    real = torch.ones(case["batch"], case["n"], dtype=torch.bool) if kv is None else kv
    return real[:, None, :, None]


def on_real_queries(case, out, ref):
    """out where the query is a real token, ref elsewhere: what a padding query attends is no
    reference's business (SDPA's padding rows are uniform or NaN)."""
    return torch.where(real_queries(case), out, ref)


@settings(max_examples=EXAMPLES)
@given(case=cases())
def test_sketchwalk_equals_sdpa_and_the_oracle(case):
    full = SketchWalkConfig(density=1.0, dense_below=0, dense_layers=0)
    default = SketchWalkConfig(dense_below=0, dense_layers=0)
    stance = contextlib.nullcontext() if case["compiled"] else torch.compiler.set_stance("force_eager")
    with torch.no_grad(), stance:
        # full budget: SDPA
        mask = dense_mask(case)
        for layer, out in enumerate(run(case, full)):
            assert torch.isfinite(out).all(), f"full budget, layer {layer}: non-finite output"
            q, k, v = layer_inputs(case, layer)
            ref_lp = sdpa(q, k, v, mask, case["softcap"])
            ref_hp = sdpa(q.double(), k.double(), v.double(), mask, case["softcap"])
            extra = 0.0 if case["softcap"] is None else case["softcap"] * torch.finfo(q.dtype).eps * v.abs().max().item()
            err, allowed = error_budget(on_real_queries(case, out, ref_lp), ref_lp.nan_to_num(), ref_hp.nan_to_num(),
                                        extra=extra)
            assert err <= allowed, f"full budget, layer {layer}: {err:.3g} > {allowed:.3g} against SDPA"

        # default density: the eager oracle, layer by layer on the oracle's own walk
        outs = run(case, default)
        state = None
        for layer, out in enumerate(outs):
            assert torch.isfinite(out).all(), f"default density, layer {layer}: non-finite output"
            q, k, v = layer_inputs(case, layer)
            if case["window"] is not None:  # a sliding-window layer keeps its window, dense inside it
                ref_mask = mask
            else:
                _, state, sel = eager_sketchwalk_attention(q, k, v, default, layer, state, key_valid=case["key_valid"],
                                                           softcap=case["softcap"])
                ref_mask = token_mask(case["n"], selection=sel, key_valid=case["key_valid"])
            ref = reference_attention(q, k, v, ref_mask, softcap=case["softcap"])
            err, allowed = reference_error_budget(q, k, v, ref_mask, on_real_queries(case, out, ref),
                                                  softcap=case["softcap"])
            assert err <= allowed, f"default density, layer {layer}: {err:.3g} > {allowed:.3g} against the oracle"

        # each row alone: the last row (padded, holed or all padding where the mask has them)
        b = case["batch"] - 1
        if b > 0:
            solo = run(case, default, rows=slice(b, b + 1))
            for layer, (out, alone) in enumerate(zip(outs, solo)):
                tol = 4 * torch.finfo(out.dtype).eps * max(1.0, alone.abs().max().item())
                diff = (out[b:b + 1] - alone).abs().max().item()
                assert diff <= tol, f"layer {layer}: row {b} differs from its solo run by {diff:.3g} (> {tol:.3g})"
