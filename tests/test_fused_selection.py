"""The fused selection-to-mask path (compiled once with dynamic shapes on CUDA): equal to the
eager selection and the oracle, and no recompiles across prompt lengths after warm-up."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

import flexwalk
import flexwalk.attention as attention
from conftest import random_qkv
from flexwalk import SketchWalkConfig
from flexwalk.oracle import eager_sketchwalk_attention


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    monkeypatch.setattr(attention, "COMPILE_SELECTION_ON_CPU", True)


@pytest.mark.parametrize("walk", ["damped", "oracle"])
def test_compiled_fused_selection_matches_the_oracle(compiled_on_cpu, walk):
    """Three layers (walk state carried), GQA 3, left padding, a length off the block grid."""
    cfg = SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=0, walk=walk)
    q, k, v = random_qkv(2, 6, 2, 301, 16, seed=3)
    kv = torch.ones(2, 301, dtype=torch.bool)
    kv[1, :133] = False  # past 127: inductor on CUDA once computed this bound in int8
    st = ref_st = None
    for layer in range(3):
        out, st = flexwalk.sketchwalk_attention(q, k, v, cfg, layer, st, key_valid=kv)
        ref, ref_st, _ = eager_sketchwalk_attention(q, k, v, cfg, layer, ref_st, key_valid=kv)
        torch.testing.assert_close(st.transition, ref_st.transition, rtol=0, atol=1e-6)
        real = kv[:, None, :, None]
        err = ((out - ref) * real).abs().max().item()
        assert err <= 4 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item()) * 16


def test_one_compile_across_lengths(compiled_on_cpu):
    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_below=0, dense_layers=0)

    def run(n):
        q, k, v = random_qkv(1, 4, 2, n, 16, seed=n)
        flexwalk.sketchwalk_attention(q, k, v, cfg, 1, None)

    for n in (260, 270, 290):  # warm-up: the dynamic graph and its first specialisations
        run(n)
    before = dynamo_counters["stats"]["unique_graphs"]
    for n in (257, 263, 271, 280, 288, 295, 300, 313, 320, 333):  # one flex bucket (384), ten lengths
        run(n)
    assert dynamo_counters["stats"]["unique_graphs"] == before
