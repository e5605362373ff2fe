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
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import SketchWalkConfig
from ..integrations.settings import config_for_model
from ..reference import eager_sketchwalk_attention, reference_attention, token_mask
from ..selection.sketch import num_blocks
from ..selection.walk import oracle_block_mass

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


# One field varied at a time around the base preset.
ABLATIONS: dict[str, list[dict[str, Any]]] = {
    "density": [{"density": d} for d in (0.1, 0.2, 0.3, 0.5)],
    "walk": [{"walk": w} for w in ("walk", "damped", "one_hop", "oracle")],
    # the mean-key rule, the only one sketch_dim applies to; capped at the head dim (Gemma 3: 256)
    "sketch_dim": [{"sketch_dim": r, "prefill_scoring": "sketch"} for r in (16, 32, 64, 128, 256)],
    "exponent": [{"sparsity_exponent": e} for e in (1.0, 4.0, 8.0, 16.0)],
    # 64 / 128 / 64x128: 64-token key blocks chosen per 128-row kernel query block (query_block_size)
    "block_size": [{"block_size": 64}, {"block_size": 128}, {"block_size": 64, "query_block_size": 128}],
    "dense_layers": [{"dense_layers": n} for n in (0, 1, 2)],
    "damping": [{"damping": b} for b in (0.0, 0.25, 0.5, 0.75)],
    "walk_steps": [{"walk_steps": s} for s in (1, 2, 3, 4)],  # with the base walk (damped): the authors' code uses 3
    "dense_tail": [{"dense_tail_blocks": t} for t in (0, 1, 2, 4)],
    "sink": [{"sink_blocks": n} for n in (1, 2, 4)],
    "local": [{"local_blocks": n} for n in (1, 2, 4)],
    "head_scoring": [{"head_scoring": h} for h in ("mean", "per_head")],
    "prefill_scoring": [{"prefill_scoring": s} for s in ("sketch", "bound")],
}


def grid(base: SketchWalkConfig, groups: list[str]) -> list[tuple[str, dict[str, Any], SketchWalkConfig]]:
    """(group, change, config) for every change of every group, applied to `base`."""
    return [(g, change, base.replace(**change)) for g in groups for change in ABLATIONS[g]]


def run_ablation(model, tokenizer, prompts: list[tuple[str, int, dict]], configs: list, out: Path,
                 meta: dict[str, Any], *, kl: bool = True, layer_fn=None) -> list[dict[str, Any]]:
    """Every configuration of `configs` (grid) on every prompt ((task, length, record)): the
    per-layer fidelity of its replayed layers and (kl) the next-token KL against dense.  OUT.json
    (every number) and OUT.md (`markdown`) are rewritten after every configuration, so that an
    interrupted run keeps what it measured, marked incomplete.  layer_fn: the per-layer measure
    (default `layer_fidelity`).  Returns the results."""
    layer_fn = layer_fidelity if layer_fn is None else layer_fn
    results: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(complete: bool) -> None:
        done = {**meta, "complete": complete, "measured": len(results), "planned": len(prompts) * len(configs)}
        Path(f"{out}.json").write_text(json.dumps({"meta": done, "results": results}, indent=1))
        Path(f"{out}.md").write_text(markdown(results, done))

    t0 = time.perf_counter()
    for p_i, (task, length, rec) in enumerate(prompts):
        ids = torch.tensor([tokenizer(rec["input"] + rec.get("answer_prefix", "")).input_ids])
        inputs, logits = capture_attention_inputs(model, ids)  # logits of the last 64 positions, as next_token_kl
        for c_i, (group, change, cfg) in enumerate(configs):
            layers = layer_fn(model, inputs, cfg)
            sparse = [r for r in layers if r["sparse"]]
            kl_value = next_token_kl(model, ids, cfg, dense_logits=logits) if kl else None
            results.append({
                "task": task, "length": length, "index": rec["index"], "group": group, "change": change,
                "config": cfg.to_dict(), "kl": kl_value, "layers": layers,
                "rel_error": sum(r["rel_error"] for r in sparse) / max(1, len(sparse)),
                "recall": sum(r["recall"] for r in sparse) / max(1, len(sparse)),
                "density": sum(r["density"] for r in sparse) / max(1, len(sparse)),
            })
            print(f"[{p_i + 1}/{len(prompts)} {c_i + 1}/{len(configs)} {time.perf_counter() - t0:.0f}s] {task} {length} "
                  f"{group} {change}: err {results[-1]['rel_error']:.3f} recall {results[-1]['recall']:.3f} "
                  f"density {results[-1]['density']:.3f} kl {kl_value if kl_value is None else round(kl_value, 4)}",
                  file=sys.stderr, flush=True)
            write(complete=False)
        del inputs
    write(complete=True)
    return results


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One row per configuration: means over prompts of the sparse layers' means."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        rows.setdefault((r["group"], json.dumps(r["change"])), []).append(r)
    lines = [f"model {meta['model']}, {meta['prompts']} prompts ({', '.join(meta['tasks'])} at "
             f"{', '.join(map(str, meta['lengths']))} tokens); base: every other field as in the base config."
             + ("" if meta.get("complete", True) else
                f" **Incomplete:** {meta['measured']} of {meta['planned']} measurements (the run ended early)."), "",
             "| group | change | density | attention output rel. error | dense-mass recall | next-token KL (nats) |",
             "|---|---|---|---|---|---|"]
    for (group, change), rs in rows.items():
        mean = lambda key: sum(x[key] for x in rs) / len(rs)  # noqa: E731
        kls = [x["kl"] for x in rs if x["kl"] is not None]
        kl = f"{sum(kls) / len(kls):.4f}" if kls else "-"
        lines.append(f"| {group} | {', '.join(f'{k}={v}' for k, v in json.loads(change).items())} | "
                     f"{mean('density'):.3f} | {mean('rel_error'):.3f} | {mean('recall'):.3f} | {kl} |")
    return "\n".join(lines) + "\n"
