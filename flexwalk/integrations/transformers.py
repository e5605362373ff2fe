"""transformers integration: attn_implementation="sketchwalk_flex".

`register()` (run by `import flexwalk`) adds an attention function and a mask function under
one name.  The mask function runs once per forward (once per layer type in hybrid models)
and returns a `SketchWalkMask` (integrations.masks): the per-forward context holding padding,
offsets and the walk state that sparse layers hand to each other.

Per-model settings (integrations.settings): `configure(model, config, **options)` stores a
SketchWalkConfig and Options on the model's attention modules (two models never share them);
otherwise `model.config.sketchwalk_config` (a SketchWalkConfig, a dict of its fields or a preset
name, also accepted by `from_pretrained(..., sketchwalk_config=...)`) is used, else the default
preset.  Each attention call reads its model's options once (`flexwalk.options(...)` scopes
apply over them) and hands them to the prefill and decode functions.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from .. import stats
from ..config import SketchWalkConfig
from ..decode.state import DecodePaddingError, DecodeState
from ..decode.step import sketchwalk_decode
from ..kernels.dense import dense_attention, masked_attention
from ..prefill import sketchwalk_attention
from ..selection.sketch import layer_sketch
from ..varlen import VarlenWalkState, sketchwalk_varlen_attention
from .masks import SMALL_QUERY, SketchWalkMask, sketchwalk_mask_function
from .settings import CONFIG_ATTR, configure_modules, effective_config, module_options, process_group

ATTN_IMPLEMENTATION = "sketchwalk_flex"
_STATE_ATTR = "_flexwalk_decode_state"  # a module's DecodeState


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
    cfg = effective_config(module)
    group = process_group(module, query)
    opts = module_options(module)
    softcap = kwargs.get("softcap", None)
    window = kwargs.get("sliding_window")
    window = None if window is None else int(window)
    ctx = attention_mask
    bsz, _, L, _ = query.shape
    S = key.shape[2]
    if ctx is None:  # no mask was built: plain causal, queries are the last L keys
        ctx = SketchWalkMask(bsz, L, S, S - L, 0, None, causal_mask_function, query.device)
    elif isinstance(ctx, torch.Tensor):  # a 4D mask built by the caller: honoured exactly, dense
        return _custom_mask_attention(module, query, key, value, ctx, scaling, softcap), None
    elif not isinstance(ctx, SketchWalkMask):
        raise ValueError(
            f"sketchwalk_flex: attention_mask of type {type(ctx).__name__} is not supported: pass a 2D padding mask "
            "[batch, keys], a 4D mask [batch, 1 or heads, queries, keys] (bool, or float added to the logits) or none"
        )
    layer_idx = getattr(module, "layer_idx", None)
    # Layers that keep a decode state: full-attention layers past dense_layers, sparse decode on,
    # under a causal mask function (a custom one would not be followed by the decode masks).
    track = (not cfg.skip_decode and window is None and layer_idx is not None and layer_idx >= cfg.dense_layer_count
             and (ctx.mask_function is causal_mask_function or ctx.mask_kind(None) == "causal"))
    if L <= SMALL_QUERY:
        if track:
            out = _tracked_small_query(module, cfg, ctx, query, key, value, scaling, softcap, group, opts)
            if out is not None:
                return out.transpose(1, 2).contiguous(), None
        else:
            stats.count(_small_query_path(cfg, ctx, layer_idx, window, L, S))
        out = masked_attention(query, key, value, ctx.small_mask()[..., :S], scale=scaling, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None
    kind = ctx.mask_kind(window)
    if kind == "custom":
        _drop_state(module)
        return _custom_mask_attention(module, query, key, value, ctx.transformers_mask(), scaling, softcap), None
    if kind == "packed":
        _drop_state(module)
        return _packed_attention(cfg, ctx, layer_idx, query, key, value, scaling, softcap, window, group,
                                 opts), None
    key_valid = ctx.key_valid
    static = ctx.q_offset == 0 and L < S
    if static:  # static cache: slots past the prompt are not written yet
        key, value = key[:, :, :L], value[:, :, :L]
        key_valid = None if key_valid is None else key_valid[:, :L]
        S = L
    if ctx.q_offset != 0 or ctx.kv_offset != 0 or L != S:
        if track and ctx.holes:
            _drop_state(module)
            _log_decode_padding()
        elif track and (state := _matching_state(module, query, key, L, ctx.q_offset)) is not None:
            state.absorb(query, key[:, :, ctx.q_offset : ctx.q_offset + L], ctx.new_valid())
            end = ctx.q_offset + L  # a prompt continued in chunks: pin from its new last queries
            state.pin(query, key[:, :, :end], key_valid=None if key_valid is None else key_valid[:, :end],
                      softcap=softcap)
        stats.count(stats.DENSE_CACHED_PREFILL)
        out = dense_attention(
            query, key, value, key_valid=key_valid, scale=scaling, softcap=softcap, window=window,
            q_offset=ctx.q_offset - ctx.kv_offset, block_size=cfg.block_size,
        )
        return out.transpose(1, 2).contiguous(), None
    if layer_idx is None:
        raise NotImplementedError(
            f"sketchwalk_flex: attention module {type(module).__name__} has no layer_idx; the walk needs layer order"
        )
    sketch = layer_sketch(query, key, cfg, layer_idx, key_valid=key_valid, scale=scaling,
                          process_group=group) if track else None
    out, state = sketchwalk_attention(
        query, key, value, cfg, layer_idx, None if window is not None else ctx.walk_state,
        key_valid=key_valid, scale=scaling, softcap=softcap, window=window, holes=ctx.holes, sketch=sketch,
        process_group=group, options=opts,
    )
    if window is None:
        ctx.walk_state = state
    if track:
        _new_state(module, cfg, query, key, key_valid, scaling, sketch, kv_tokens=ctx.kv_length if static else None,
                   process_group=group, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def _new_state(module, cfg, query, key, key_valid, scaling, sketch, *, kv_tokens, process_group=None,
               softcap=None) -> None:
    """Build the layer's decode state from this prefill (a new sequence starts here)."""
    try:
        state = DecodeState.from_prefill(
            query, key, cfg, module.layer_idx, key_valid=key_valid, scale=scaling, kv_tokens=kv_tokens,
            growable=kv_tokens is None, sketch=sketch, process_group=process_group, softcap=softcap,
        )
    except DecodePaddingError:
        _drop_state(module)
        _log_decode_padding()
        return
    setattr(module, _STATE_ATTR, state)


def _log_decode_padding() -> None:
    stats.log_once(
        "decode-padding",
        "flexwalk: sparse decode needs left padding (generate() pads on the left); this batch is padded on the "
        "right or has padding between real tokens, so its decode steps run dense",
    )


def _custom_mask_attention(module, query, key, value, mask: torch.Tensor, scaling, softcap) -> torch.Tensor:
    """Exact attention under a 4D mask (bool, or float added to the logits), as transformers' sdpa
    runs it: the mask's keys cut to the keys given (a static cache's mask is longer).  Counted."""
    if mask.dim() != 4 or mask.shape[-1] < key.shape[2] or mask.shape[-2] != query.shape[2]:
        raise ValueError(
            f"sketchwalk_flex: attention_mask of shape {tuple(mask.shape)} is invalid for {query.shape[2]} queries "
            f"and {key.shape[2]} keys: a 4D mask must be [batch, 1 or heads, queries, >= keys]"
        )
    stats.count(stats.CUSTOM_MASK)
    out = masked_attention(query, key, value, mask[..., : key.shape[2]], scale=scaling, softcap=softcap)
    return out.transpose(1, 2).contiguous()


def _packed_attention(cfg, ctx, layer_idx, query, key, value, scaling, softcap, window, group, opts) -> torch.Tensor:
    """Packed sequences (ctx.documents: several documents in a row, transformers' padding-free
    inputs) through the varlen path: the rows flattened into FlashAttention's packed layout, one
    sequence per document, each selected and attended on its own in one kernel launch, with its
    own walk across the layers (ctx.walk_state: a VarlenWalkState).  [B, L, Hq, D] out."""
    if layer_idx is None:
        raise NotImplementedError("sketchwalk_flex: packed sequences need the attention module's layer_idx")
    stats.count(stats.PACKED_SEQUENCES)
    bsz, hq, L, d = query.shape
    ends = [row * L + end for row, _, end in ctx.documents]
    cu = torch.tensor([0, *ends], dtype=torch.int32, device=query.device)
    q, k, v = (t.transpose(1, 2).reshape(bsz * L, t.shape[1], d) for t in (query, key, value))
    state = ctx.walk_state if isinstance(ctx.walk_state, VarlenWalkState) else None
    out, state = sketchwalk_varlen_attention(q, k, v, cu, None, cfg, layer_idx, state, scale=scaling,
                                             softcap=softcap, window=window, process_group=group, options=opts)
    if window is None:
        ctx.walk_state = state
    return out.reshape(bsz, L, hq, d)


def _drop_state(module, counted: bool = False) -> None:
    if getattr(module, _STATE_ATTR, None) is not None:
        setattr(module, _STATE_ATTR, None)
        if counted:
            stats.count(stats.DECODE_STATE_RESET)


def _small_query_path(cfg, ctx, layer_idx, window, L, S) -> str:
    """Counter name for a dense query of <= SMALL_QUERY tokens on a layer without decode state."""
    if L > 1:
        offset = ctx.q_offset if isinstance(ctx.q_offset, int) else None
        return stats.DENSE_SHORT if offset == 0 or S == L else stats.DENSE_CACHED_PREFILL
    if cfg.skip_decode:
        return stats.DENSE_DECODE
    if window is not None:
        return stats.SLIDING_WINDOW
    return stats.DENSE_LAYER


def _matching_state(module, query, key, L, offset: int | None) -> DecodeState | None:
    """The layer's state if it continues this sequence; else drop it (counted).

    offset: this forward's first position, or None when it stays on the device (a static
    cache's one-token step: the position is then checked on the device by the decode step).
    """
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        return None
    fits = state.batch == query.shape[0] and state.head_dim == query.shape[-1]
    if state.growable:
        fits = fits and offset is not None and key.shape[2] == offset + L
    else:
        fits = fits and key.shape[2] == state.kv_tokens
    if not fits or (offset is not None and offset != state.length):
        _drop_state(module, counted=True)
        return None
    return state


def _tracked_small_query(module, cfg, ctx, query, key, value, scaling, softcap, group=None,
                         opts=None) -> torch.Tensor | None:
    """Queries of <= SMALL_QUERY tokens on a layer that keeps a decode state.

    Returns the sparse decode output [B, Hq, 1, D], or None after updating the state and
    counting the dense path, so the caller runs transformers' exact mask.
    """
    L, S = query.shape[2], key.shape[2]
    offset = ctx.known_offset()
    if offset == 0:  # a short prompt starts a new sequence
        _new_state(module, cfg, query, key[:, :, :L], ctx.new_valid(), scaling, None,
                   kv_tokens=S if S > L else None, process_group=group, softcap=softcap)
        stats.count(stats.DENSE_SHORT)
        return None
    state = _matching_state(module, query, key, L, offset)
    if state is None:
        stats.count(stats.DENSE_DECODE_NO_STATE)
        return None
    if L > 1 or state.length + 1 < cfg.min_sparse_length(query.device):
        # Several tokens, or too short for sparse decode to pay: keep the state current, attend densely.
        start = state.pos if offset is None else offset
        cols = torch.arange(L, device=key.device) + start
        state.absorb(query, key.index_select(2, cols), ctx.new_valid())
        stats.count(stats.DENSE_CACHED_PREFILL if L > 1 else stats.DENSE_DECODE_SHORT)
        return None
    out, row = sketchwalk_decode(
        query, key, value, state, ctx.decode_row, scale=scaling, softcap=softcap, valid=ctx.new_valid(),
        position=None if offset is not None else ctx.q_offset, options=opts,
    )
    ctx.decode_row = row
    stats.count(stats.SPARSE_DECODE)
    if cfg.uses_residual:
        stats.log_once("residual_decode", "flexwalk: residual=True applies to prefill; sparse decode steps attend "
                       "only their selected blocks (logged once)")
    return out


def reset_decode_state(model: torch.nn.Module) -> int:
    """Drop every layer's sparse-decode state (the next prefill builds new ones); returns how many."""
    n = 0
    for m in model.modules():
        if getattr(m, _STATE_ATTR, None) is not None:
            setattr(m, _STATE_ATTR, None)
            n += 1
    return n


def decode_states(model: torch.nn.Module) -> dict[int, DecodeState]:
    """{layer_idx: DecodeState} of the layers holding sparse-decode state (for inspection)."""
    return {
        m.layer_idx: st for m in model.modules() if (st := getattr(m, _STATE_ATTR, None)) is not None
    }


_DYNAMO_SAFE_ATTENTION = torch._dynamo.disable(sketchwalk_flex_attention)
_DYNAMO_SAFE_MASK = torch._dynamo.disable(sketchwalk_mask_function)


def _no_auto_compile(original):
    """generate() compiles a model's forward with CUDA graphs when it decodes into a static
    cache on a GPU.  sketchwalk_flex layers are graph breaks (they keep host-side state and run
    their own compiled kernels), and CUDA-graph replays of the layer body between the breaks
    overwrite each other's outputs; so models using sketchwalk_flex skip that auto-compile."""

    @functools.wraps(original)
    def valid_auto_compile_criteria(self, *args, **kwargs):
        if getattr(getattr(self, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION:
            if original(self, *args, **kwargs):
                stats.log_once(
                    "no-auto-compile",
                    "flexwalk: generate() would compile this model's forward (static cache on a GPU); "
                    "skipped for sketchwalk_flex, whose kernels are compiled already",
                )
            return False
        return original(self, *args, **kwargs)

    valid_auto_compile_criteria._flexwalk = True
    return valid_auto_compile_criteria


def register() -> None:
    """Register "sketchwalk_flex" with transformers (idempotent; `import flexwalk` calls it)."""
    # generate() compiles the model's forward by itself on CUDA with a static cache; our
    # functions hold host-side state (decode states, counters, per-forward context) and run
    # their own compiled kernels, so dynamo steps around them (a graph break per call).
    AttentionInterface.register(ATTN_IMPLEMENTATION, _DYNAMO_SAFE_ATTENTION)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _DYNAMO_SAFE_MASK)
    # Lets from_pretrained(..., sketchwalk_config=...) land on the model config, stored as a
    # plain dict so config.json (and the config's repr) stay JSON-serialisable.
    try:
        from transformers.generation.utils import GenerationMixin
    except ImportError:  # pragma: no cover - very old transformers
        GenerationMixin = None
    crit = getattr(GenerationMixin, "_valid_auto_compile_criteria", None)
    if crit is not None and not getattr(crit, "_flexwalk", False):
        GenerationMixin._valid_auto_compile_criteria = _no_auto_compile(crit)
    if not isinstance(getattr(PretrainedConfig, CONFIG_ATTR, None), property):
        setattr(PretrainedConfig, CONFIG_ATTR, property(_get_config_attr, _set_config_attr))


def _get_config_attr(self):
    return self.__dict__.get(CONFIG_ATTR)


def _set_config_attr(self, value):
    if isinstance(value, SketchWalkConfig):
        value = value.to_dict()
    self.__dict__[CONFIG_ATTR] = value


def configure(model: torch.nn.Module, config: SketchWalkConfig | dict | str | None = None, *, enable: bool = True,
              **options: Any):
    """Give `model` its own SketchWalkConfig (None: the default preset) and Options fields, and
    (by default) switch it to sketchwalk_flex.

    Both are stored on the model's modules, so two models in one process never share them, even
    when they were built from one config object; a later call replaces both.  options: fields of
    flexwalk.Options (e.g. prefill_kernel="triton"); an unknown field or value is a ValueError.
    Returns the model.
    """
    configure_modules(model, config, **options)
    if enable and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
