"""What a vLLM engine runs SketchWalk with: its SketchWalkConfig and Options, read once at start-up.

Two sources, the engine's own first:

    LLM(model, additional_config={"sketchwalk": {"density": 0.2}, "flexwalk_options": {...}})
    vllm serve MODEL --additional-config '{"sketchwalk": {"density": 0.2}}'
    FLEXWALK_CONFIG='{"density": 0.2}' FLEXWALK_OPTIONS='{"prefill_kernel": "flex"}' vllm serve MODEL

The config is a dict of SketchWalkConfig fields or a preset name (JSON in the environment
variable; a bare preset name is accepted too); the options a dict of Options fields.  Without
either, the "default" preset.  Anything invalid raises ValueError naming its source and the
field, when the plugin loads (environment) or when the engine builds its attention layers
(additional_config): the engine fails to start instead of serving with another config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import PRESETS, SketchWalkConfig
from ..options import Options, check_fields, resolve
from .settings import coerce_config, config_for_model

ENV_CONFIG = "FLEXWALK_CONFIG"
"""Environment variable: the SketchWalkConfig, as JSON (a dict of fields) or a preset name."""
ENV_OPTIONS = "FLEXWALK_OPTIONS"
"""Environment variable: Options fields, as a JSON dict."""
CONFIG_KEY = "sketchwalk"
"""Key of vLLM's additional_config holding the SketchWalkConfig (a dict of fields or a preset name)."""
OPTIONS_KEY = "flexwalk_options"
"""Key of vLLM's additional_config holding the Options fields (a dict)."""


@dataclass(frozen=True)
class EngineSettings:
    """The SketchWalkConfig (its "auto" fields decided for the served model) and the Options
    fields of one engine.  `options` is the dict of fields; `Options` scopes apply over it."""

    config: SketchWalkConfig
    options: tuple  # sorted (field, value) pairs: hashable

    def option_fields(self) -> dict[str, Any]:
        return dict(self.options)


def _parse_env(name: str, text: str, *, allow_name: bool) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if allow_name and text.strip() in PRESETS:
            return text.strip()
        raise ValueError(f"{name}={text!r} is invalid: not JSON ({err.msg})"
                         + (f" and not a preset name ({sorted(PRESETS)})" if allow_name else "")) from None


def _config(raw: Any, source: str) -> SketchWalkConfig:
    if raw is None:
        return PRESETS["default"]
    try:
        cfg = coerce_config(raw, source)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from None
    if not cfg.skip_decode:  # decode steps read vLLM's paged cache: no SketchWalk decode state there
        raise ValueError(f"{source}: SketchWalkConfig.skip_decode=False (sparse decode) is not supported in vLLM; "
                         "decode steps run vLLM's attention")
    return cfg


def _options(raw: Any, source: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}={raw!r} is invalid: expected a dict of flexwalk Options fields")
    try:
        check_fields(raw)
        resolve(raw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from None
    return dict(raw)


def environment_settings(environ: Mapping[str, str] | None = None) -> tuple[SketchWalkConfig, dict[str, Any]]:
    """The config and Options fields the environment sets (FLEXWALK_CONFIG, FLEXWALK_OPTIONS),
    validated: ValueError naming the variable and the field."""
    env = os.environ if environ is None else environ
    raw_cfg = env.get(ENV_CONFIG)
    raw_opts = env.get(ENV_OPTIONS)
    cfg = _config(None if not raw_cfg else _parse_env(ENV_CONFIG, raw_cfg, allow_name=True), ENV_CONFIG)
    opts = _options(None if not raw_opts else _parse_env(ENV_OPTIONS, raw_opts, allow_name=False), ENV_OPTIONS)
    return cfg, opts


def engine_settings(additional_config: Any, hf_config: Any = None,
                    environ: Mapping[str, str] | None = None) -> EngineSettings:
    """The settings of an engine: additional_config's "sketchwalk" / "flexwalk_options" where
    present, else the environment's; the config's "auto" fields decided for the model whose
    transformers config is `hf_config` (hybrid sliding-window models: residual, dense_layers)."""
    env_cfg, env_opts = environment_settings(environ)
    extra = additional_config if isinstance(additional_config, dict) else {}
    cfg = _config(extra[CONFIG_KEY], f"additional_config[{CONFIG_KEY!r}]") if CONFIG_KEY in extra else env_cfg
    opts = (_options(extra[OPTIONS_KEY], f"additional_config[{OPTIONS_KEY!r}]") if OPTIONS_KEY in extra
            else env_opts)
    return EngineSettings(config_for_model(cfg, hf_config), tuple(sorted(opts.items())))


def current_engine_settings() -> EngineSettings:
    """`engine_settings` of the vLLM config being built (inside an attention layer's constructor)."""
    from vllm.config import get_current_vllm_config

    vc = get_current_vllm_config()
    hf_config = getattr(getattr(vc, "model_config", None), "hf_config", None)
    return engine_settings(getattr(vc, "additional_config", None), hf_config)
