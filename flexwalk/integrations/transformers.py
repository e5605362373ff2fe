"""transformers integration: attn_implementation="sketchwalk_flex".

`register()` (run by `import flexwalk`) adds an attention function and a mask function under
one name.  The mask function runs once per forward (once per layer type in hybrid models)
and returns a `SketchWalkMask`: the per-forward context holding padding, offsets and the
walk state that sparse layers hand to each other.  Its lifetime is one forward call.

Per-model settings: `configure(model, config)` stores a SketchWalkConfig on the model's
attention modules (two models never share it); otherwise `model.config.sketchwalk_config`
(a SketchWalkConfig, a dict of its fields or a preset name, also accepted by
`from_pretrained(..., sketchwalk_config=...)`) is used, else the default preset.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .. import stats
from ..attention import dense_attention, masked_attention, sketchwalk_attention
from ..block_mask import check_contiguous_padding
from ..config import PRESETS, SketchWalkConfig
from ..walk import WalkState

ATTN_IMPLEMENTATION = "sketchwalk_flex"
CONFIG_ATTR = "sketchwalk_config"
_MODULE_ATTR = "_flexwalk_config"
# Queries of at most this many tokens (decode, short continuations) use transformers' own
# mask, built for those rows only ([B, 1, L, S]): exact for every cache layout.
SMALL_QUERY = 32


class SketchWalkMask:
    """Per-forward context returned by the mask function and seen by every layer.

    key_valid: [B, S] bool (False at padding) or None.  q_offset: absolute position of the
    first query (int in prefill, possibly a tensor in decode with a static cache).
    walk_state: WalkState of the last sparse layer of this forward pass.
    """

    def __init__(self, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, mask_function, device):
        self.batch_size = batch_size
        self.q_length = q_length
        self.kv_length = kv_length
        self.kv_offset = kv_offset
        self.mask_function = mask_function
        self.attention_mask = attention_mask
        self.device = device
        self.walk_state: WalkState | None = None
        self._small_mask: torch.Tensor | None = None
        self._checked_windows: set = set()
        if q_length > SMALL_QUERY:
            # One host sync per forward (transformers' own sdpa mask does the same).
            self.q_offset = int(q_offset)
            key_valid = None
            if attention_mask is not None:
                am = attention_mask.to(device=device, dtype=torch.bool)[:, kv_offset : kv_offset + kv_length]
                if am.shape[-1] < kv_length:
                    am = torch.nn.functional.pad(am, (0, kv_length - am.shape[-1]), value=False)
                live = am[:, : self.q_offset + q_length]  # keys written so far
                if not bool(live.all()):
                    check_contiguous_padding(live)
                    key_valid = am
            self.key_valid = key_valid
        else:
            self.q_offset = q_offset
            self.key_valid = None

    # generate() with a static cache builds the mask itself, calls .contiguous() on it and
    # hands it to the model, whose mask function then passes it through (see below).
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def contiguous(self) -> "SketchWalkMask":
        return self

    def small_mask(self) -> torch.Tensor:
        """transformers' boolean mask for these few query rows, [B, 1, L, S]."""
        if self._small_mask is None:
            self._small_mask = sdpa_mask(
                batch_size=self.batch_size,
                q_length=self.q_length,
                kv_length=self.kv_length,
                q_offset=self.q_offset,
                kv_offset=self.kv_offset,
                mask_function=self.mask_function,
                attention_mask=self.attention_mask,
                allow_is_causal_skip=False,
                device=self.device,
            )
        return self._small_mask

    def check_mask_function(self, window: int | None) -> None:
        """Refuse mask functions that are not causal (+ this window): never silently wrong."""
        if window in self._checked_windows:
            return
        if not (window is None and self.mask_function is causal_mask_function):
            _probe_mask_function(self.mask_function, window, self.batch_size, self.device)
        self._checked_windows.add(window)


def _probe_mask_function(fn, window: int | None, batch: int, device) -> None:
    span = 24
    w = window if window is not None else 0
    anchors = sorted({0, 37, w + 5, 2 * w + 101, 4096 + 3})
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    for a in anchors:
        q = torch.arange(a, a + span, device=device)
        lo = max(0, a - w - span)
        kv = torch.arange(lo, a + 2 * span, device=device)
        got = fn(b, h, q[None, None, :, None], kv[None, None, None, :])
        want = kv[None, :] <= q[:, None]
        if window is not None:
            want = want & (kv[None, :] > q[:, None] - window)
        if not torch.equal(got.expand(batch, 1, -1, -1), want[None, None].expand(batch, 1, -1, -1)):
            kind = "sliding-window causal" if window is not None else "causal"
            raise NotImplementedError(
                f"sketchwalk_flex supports {kind} masks only; this model built a different mask function "
                "(packed sequences, chunked attention or a bidirectional overlay): feature not supported"
            )


def sketchwalk_mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> SketchWalkMask:
    """Mask interface for transformers: returns the per-forward SketchWalkMask context."""
    if isinstance(attention_mask, SketchWalkMask):  # built by generate(); this is a new forward
        attention_mask.walk_state = None
        return attention_mask
    return SketchWalkMask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, mask_function, device)


def resolve_config(module: torch.nn.Module) -> SketchWalkConfig:
    """The SketchWalkConfig of the model this attention module belongs to."""
    cfg = getattr(module, _MODULE_ATTR, None)
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


def _check_supported(module, kwargs, dropout) -> None:
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("sketchwalk_flex: attention sinks (s_aux) are not supported")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("sketchwalk_flex: output_attentions is not supported (no attention weights)")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError("sketchwalk_flex: bidirectional (non-causal) attention is not supported")
    config = getattr(module, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError("sketchwalk_flex: encoder-decoder models are not supported")
    if dropout and module.training:
        raise NotImplementedError("sketchwalk_flex: training with attention dropout is not supported")


def sketchwalk_flex_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B,Hq,L,D], k/v [B,Hkv,S,D] -> ([B,L,Hq,D], None)."""
    _check_supported(module, kwargs, dropout)
    cfg = resolve_config(module)
    softcap = kwargs.get("softcap", None)
    window = kwargs.get("sliding_window")
    window = None if window is None else int(window)
    ctx = attention_mask
    bsz, _, L, _ = query.shape
    S = key.shape[2]
    if ctx is None:  # no mask was built: plain causal, queries are the last L keys
        ctx = SketchWalkMask(bsz, L, S, S - L, 0, None, causal_mask_function, query.device)
    elif not isinstance(ctx, SketchWalkMask):
        raise NotImplementedError(
            f"sketchwalk_flex: a precomputed attention mask of type {type(ctx).__name__} is not supported; "
            "pass a 2D padding mask (or none) so the mask is built by sketchwalk_flex"
        )
    if L <= SMALL_QUERY:
        stats.count(stats.DENSE_DECODE if L == 1 else (stats.DENSE_SHORT if S == L else stats.DENSE_CACHED_PREFILL))
        out = masked_attention(query, key, value, ctx.small_mask()[..., :S], scale=scaling, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None
    ctx.check_mask_function(window)
    key_valid = ctx.key_valid
    if ctx.q_offset == 0 and L < S:  # static cache: slots past the prompt are not written yet
        key, value = key[:, :, :L], value[:, :, :L]
        key_valid = None if key_valid is None else key_valid[:, :L]
        S = L
    if ctx.q_offset != 0 or ctx.kv_offset != 0 or L != S:
        stats.count(stats.DENSE_CACHED_PREFILL)
        out = dense_attention(
            query, key, value, key_valid=key_valid, scale=scaling, softcap=softcap, window=window,
            q_offset=ctx.q_offset - ctx.kv_offset, block_size=cfg.block_size,
        )
        return out.transpose(1, 2).contiguous(), None
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise NotImplementedError(
            f"sketchwalk_flex: attention module {type(module).__name__} has no layer_idx; the walk needs layer order"
        )
    out, state = sketchwalk_attention(
        query, key, value, cfg, layer_idx, None if window is not None else ctx.walk_state,
        key_valid=key_valid, scale=scaling, softcap=softcap, window=window, check_padding=False,
    )
    if window is None:
        ctx.walk_state = state
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "sketchwalk_flex" with transformers (idempotent; `import flexwalk` calls it)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sketchwalk_flex_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sketchwalk_mask_function)
    # Lets from_pretrained(..., sketchwalk_config=...) land on the model config, stored as a
    # plain dict so config.json (and the config's repr) stay JSON-serialisable.
    if not isinstance(getattr(PretrainedConfig, CONFIG_ATTR, None), property):
        setattr(PretrainedConfig, CONFIG_ATTR, property(_get_config_attr, _set_config_attr))


def _get_config_attr(self):
    return self.__dict__.get(CONFIG_ATTR)


def _set_config_attr(self, value):
    if isinstance(value, SketchWalkConfig):
        value = value.to_dict()
    self.__dict__[CONFIG_ATTR] = value


def configure(model: torch.nn.Module, config: SketchWalkConfig | dict | str | None = None, *, enable: bool = True):
    """Give `model` its own SketchWalkConfig and (by default) switch it to sketchwalk_flex.

    The config is stored on the model's modules, so two models in one process never share it,
    even when they were built from one config object.  Returns the model.
    """
    cfg = PRESETS["default"] if config is None else coerce_config(config)
    mconf = getattr(model, "config", None)
    if getattr(mconf, "is_encoder_decoder", False):
        raise NotImplementedError("sketchwalk_flex: encoder-decoder models are not supported")
    for m in model.modules():
        setattr(m, _MODULE_ATTR, cfg)
    if enable and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
