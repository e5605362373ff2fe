"""Fidelity measures that need no right answer: how far a sparse configuration is from dense.

For one prompt, one dense forward (SDPA) records every layer's post-RoPE q, k, v
(`capture_attention_inputs`).  Then, for any SketchWalk configuration, `layer_fidelity` replays
the selection layer by layer on those same inputs (the walk state carried across layers, as
in a sparse forward) and reports per layer:

- rel_error: ||O_sparse - O_dense|| / ||O_dense|| of the attention output (Frobenius, real
  query rows), O_sparse computed exactly by the eager oracle (selection as a token mask);
- recall: the share of the dense attention mass (head mean, per query block, averaged over
  query blocks) that falls in the selected blocks;
- density: achieved fraction of the causal block triangle.

Layers run dense (below `dense_layers`, sliding-window) report rel_error 0, recall 1.
`next_token_kl` compares the model's next-token distributions, dense vs a configuration, over
the last positions of the prompt: KL(p_dense || p_sparse) in nats.

Memory is O(n^2) bool for the oracle's token mask (evaluation at up to ~16K tokens), never
on the library's own paths.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..config import SketchWalkConfig
from ..integrations.transformers import config_for_model
from ..oracle import eager_sketchwalk_attention, reference_attention, token_mask
from ..selection import oracle_block_mass
from ..sketch import num_blocks

CAPTURE = "flexwalk_capture"


@dataclass
class LayerInputs:
    q: torch.Tensor  # [1, Hq, n, D]
    k: torch.Tensor  # [1, Hkv, n, D]
    v: torch.Tensor
    scale: float | None
    softcap: float | None
    sliding_window: int | None


def _register_capture(store: dict[int, LayerInputs]) -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        idx = int(getattr(module, "layer_idx", len(store)))
        store[idx] = LayerInputs(
            query.detach().float().clone(), key.detach().float().clone(), value.detach().float().clone(),
            scaling, kwargs.get("softcap"), kwargs.get("sliding_window"),
        )
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)


@torch.no_grad()
def capture_attention_inputs(model, input_ids: torch.Tensor, logits_to_keep: int = 64
                             ) -> tuple[dict[int, LayerInputs], torch.Tensor]:
    """One dense forward recording each layer's (q, k, v); returns (inputs by layer, logits of the
    last `logits_to_keep` positions [1, logits_to_keep, V], what next_token_kl compares; 0: all).

    All positions would be n x V floats: 34 GB for Gemma 3's 262K vocabulary at 32K tokens."""
    store: dict[int, LayerInputs] = {}
    _register_capture(store)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        logits = model(input_ids=input_ids.to(model.device), use_cache=False,
                       logits_to_keep=logits_to_keep).logits.float()
    finally:
        model.set_attn_implementation(previous)
    return store, logits


def _sparse_layers(model, config: SketchWalkConfig) -> list[bool]:
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    return [t == "full_attention" and i >= config.dense_layer_count for i, t in enumerate(types)]


@torch.no_grad()
def layer_fidelity(model, inputs: dict[int, LayerInputs], config: SketchWalkConfig) -> list[dict[str, Any]]:
    """Per layer: rel_error, recall and density of `config` replayed on the dense run's inputs
    (residual="auto" and dense_layers="auto" decided for the model, as its attention calls decide them)."""
    config = config_for_model(config, model.config)
    rows, state = [], None
    for idx, sparse in enumerate(_sparse_layers(model, config)):
        x = inputs[idx]
        if not sparse:
            rows.append({"layer": idx, "sparse": False, "rel_error": 0.0, "recall": 1.0, "density": 1.0})
            continue
        n = x.q.shape[2]
        dense = reference_attention(x.q, x.k, x.v, token_mask(n, device=x.q.device), scale=x.scale,
                                    softcap=x.softcap)
        out, state, sel = eager_sketchwalk_attention(x.q, x.k, x.v, config, idx, state, scale=x.scale,
                                                     softcap=x.softcap)
        mass = oracle_block_mass(x.q, x.k, config.block_size, scale=x.scale)  # [1, nb, nb]
        recall = (mass * sel.block_rows().float()).sum(-1).mean().item()
        rows.append({
            "layer": idx, "sparse": True,
            "rel_error": ((out - dense).norm() / dense.norm().clamp_min(1e-30)).item(),
            "recall": recall, "density": sel.density(), "blocks": num_blocks(n, config.block_size),
        })
    return rows


@contextlib.contextmanager
def _implementation(model, config: SketchWalkConfig | None):
    import flexwalk

    previous = model.config._attn_implementation
    if config is None:
        model.set_attn_implementation("sdpa")
    else:
        flexwalk.configure(model, config)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def next_token_kl(model, input_ids: torch.Tensor, config: SketchWalkConfig, *, last: int = 64,
                  dense_logits: torch.Tensor | None = None) -> float:
    """Mean over the last `last` prompt positions of KL(p_dense || p_config), in nats."""
    ids = input_ids.to(model.device)
    if dense_logits is None:
        with _implementation(model, None):
            dense_logits = model(input_ids=ids, use_cache=False, logits_to_keep=last).logits.float()
    with _implementation(model, config):
        sparse_logits = model(input_ids=ids, use_cache=False, logits_to_keep=last).logits.float()
    dense_logits = dense_logits[:, -last:]
    p = torch.log_softmax(dense_logits, -1)
    q = torch.log_softmax(sparse_logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()
