"""What a model runs with: its SketchWalkConfig and Options, stored on its modules by `configure`
(two models never share them), else the config's `sketchwalk_config` (a SketchWalkConfig, a
dict of its fields or a preset name, also accepted by `from_pretrained(..., sketchwalk_config=...)`),
else the default preset; the config's "auto" fields decided for the model (`effective_config`);
and its tensor-parallel group.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import stats
from ..config import DEFAULT_DENSE_LAYERS, PRESETS, SketchWalkConfig
from ..distributed import mesh_group, tensor_parallel_group
from ..options import Options, check_fields, current_options, resolve

CONFIG_ATTR = "sketchwalk_config"
"""The attribute of a transformers config that may hold the model's SketchWalkConfig."""
MODULE_CONFIG_ATTR = "_flexwalk_config"
"""The attribute `configure` sets on each of a model's modules: its SketchWalkConfig."""
MODULE_OPTIONS_ATTR = "_flexwalk_options"
"""The attribute `configure` sets on each of a model's modules: its Options fields (a dict)."""
MODULE_GROUP_ATTR = "_sketchwalk_process_group"
"""The attribute `configure` sets on each of a model's modules: its tensor-parallel group."""


def configure_modules(model: torch.nn.Module, config: SketchWalkConfig | dict | str | None = None,
                      **options: Any) -> SketchWalkConfig:
    """Store the SketchWalkConfig (None: the default preset), the Options fields and the
    tensor-parallel group (the model's device mesh) on every module of `model`; returns the config.
    The options are validated first (ValueError naming the field, the value and what is allowed)."""
    check_fields(options)
    resolve(options)
    cfg = PRESETS["default"] if config is None else coerce_config(config)
    mconf = getattr(model, "config", None)
    if getattr(mconf, "is_encoder_decoder", False):
        raise NotImplementedError("sketchwalk_flex: encoder-decoder models are not supported")
    group = mesh_group(model)
    fields = dict(options)
    for m in model.modules():
        setattr(m, MODULE_CONFIG_ATTR, cfg)
        setattr(m, MODULE_OPTIONS_ATTR, fields)
        setattr(m, MODULE_GROUP_ATTR, group)
    return cfg


def set_process_group(model: torch.nn.Module, group) -> None:
    """Record `group` as the tensor-parallel group of every module of `model` (None: none
    recorded, the default world is used when its size fits)."""
    for m in model.modules():
        setattr(m, MODULE_GROUP_ATTR, group)


def module_options(module: torch.nn.Module) -> Options:
    """The Options an attention call of this module runs with: its model's `configure` fields,
    then those of the `flexwalk.options(...)` scopes around the call."""
    return current_options(getattr(module, MODULE_OPTIONS_ATTR, None))


def process_group(module: torch.nn.Module, query: torch.Tensor):
    """The process group of a tensor-parallel attention layer (tp_plan), or None when this rank
    holds every query head.  Each rank holds an equal share of the heads; the selection's block
    means are all-reduced over this group so that every rank selects what one GPU would."""
    heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return tensor_parallel_group(heads, query.shape[1], getattr(module, MODULE_GROUP_ATTR, None))


def resolve_config(module: torch.nn.Module) -> SketchWalkConfig:
    """The SketchWalkConfig of the model this attention module belongs to, as it was set."""
    cfg = getattr(module, MODULE_CONFIG_ATTR, None)
    if isinstance(cfg, SketchWalkConfig):
        return cfg
    mconf = getattr(module, "config", None)
    raw = getattr(mconf, CONFIG_ATTR, None)
    if raw is None:
        stats.log_once("default-config", "flexwalk: no SketchWalkConfig set on this model; using the 'default' preset")
        cfg = PRESETS["default"]
    else:
        cfg = coerce_config(raw, f"config.{CONFIG_ATTR}")
    return cfg


def effective_config(module: torch.nn.Module) -> SketchWalkConfig:
    """`resolve_config` with residual="auto" and dense_layers="auto" decided for the module's model
    (`model_is_hybrid`, `first_full_attention_layer`): what its attention calls run."""
    cfg = resolve_config(module)
    if cfg.residual != "auto" and cfg.dense_layers != "auto":
        return cfg
    decided = config_for_model(cfg, getattr(module, "config", None))
    if cfg.residual == "auto" and decided.residual:
        stats.log_once("residual-auto", "flexwalk: residual='auto' is on: this model mixes sliding-window and "
                       "full-attention layers, so its sparse full-attention layers also attend summaries of the "
                       "blocks they drop (residual=False turns it off)")
    if cfg.dense_layers == "auto" and decided.dense_layers != DEFAULT_DENSE_LAYERS:
        stats.log_once("dense-layers-auto", f"flexwalk: dense_layers='auto' is {decided.dense_layers}: this model's "
                       f"first full-attention layer (index {decided.dense_layers - 1}) runs dense too (an int sets it)")
    return decided


def config_for_model(cfg: SketchWalkConfig, model_config: Any) -> SketchWalkConfig:
    """`cfg.for_model` for a transformers model config (`model_is_hybrid`,
    `first_full_attention_layer`); the one decision of the attention calls and of fidelity."""
    hybrid = model_is_hybrid(model_config)
    return _for_model(cfg, hybrid, first_full_attention_layer(model_config) if hybrid else None)


def model_is_hybrid(model_config: Any) -> bool:
    """Whether a transformers model config mixes sliding-window and full-attention layers (its
    `layer_types` holds both "sliding_attention" and "full_attention": Gemma 2 and 3, Cohere 2,
    Qwen 2 with use_sliding_window, ...).  A config without layer_types counts as not hybrid."""
    types = getattr(model_config, "layer_types", None) or ()
    return "sliding_attention" in types and "full_attention" in types


def first_full_attention_layer(model_config: Any) -> int | None:
    """Index of the first "full_attention" entry of the config's layer_types (None without one)."""
    types = list(getattr(model_config, "layer_types", None) or ())
    return types.index("full_attention") if "full_attention" in types else None


@functools.lru_cache(maxsize=64)
def _for_model(cfg: SketchWalkConfig, hybrid: bool, first_full: int | None = None) -> SketchWalkConfig:
    # every layer call resolves the config: build the decided config once
    return cfg.for_model(hybrid, first_full)


def coerce_config(raw: Any, name: str = "config") -> SketchWalkConfig:
    if isinstance(raw, SketchWalkConfig):
        return raw
    if isinstance(raw, str):
        return SketchWalkConfig.preset(raw)
    if isinstance(raw, dict):
        try:
            return _config_from_items(tuple(sorted(raw.items())))
        except TypeError:  # an unhashable value: validate it uncached (and let it fail there)
            return SketchWalkConfig.from_dict(raw)
    raise ValueError(
        f"{name}={raw!r} is invalid: expected a SketchWalkConfig, a dict of its fields or a preset name "
        f"({sorted(PRESETS)})"
    )


@functools.lru_cache(maxsize=64)
def _config_from_items(items: tuple) -> SketchWalkConfig:
    # Every layer call resolves the config (every decode step too): validate each dict once.
    return SketchWalkConfig.from_dict(dict(items))
