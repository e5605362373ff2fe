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
from ..block_mask import has_holes
from ..config import DEFAULT_DENSE_LAYERS, PRESETS, SketchWalkConfig
from ..decode import DecodePaddingError, DecodeState, sketchwalk_decode
from ..selection import layer_sketch
from ..walk import WalkState

ATTN_IMPLEMENTATION = "sketchwalk_flex"
CONFIG_ATTR = "sketchwalk_config"
_MODULE_ATTR = "_flexwalk_config"
_GROUP_ATTR = "_sketchwalk_process_group"  # tensor-parallel group of the model (configure)
_STATE_ATTR = "_flexwalk_decode_state"
# Queries of at most this many tokens (decode, short continuations) use transformers' own
# mask, built for those rows only ([B, 1, L, S]): exact for every cache layout.
SMALL_QUERY = 32


class SketchWalkMask:
    """Per-forward context returned by the mask function and seen by every layer.

    key_valid: [B, S] bool (False at padding) or None; holes: whether it has padding between
    real tokens.  q_offset: absolute position of the first query (int in prefill, possibly a
    tensor in decode with a static cache).  walk_state: WalkState of the last sparse layer of
    this forward pass (a list of them, one per document, for packed sequences); decode_row: the
    decode walk row of the last sparse layer of this step.  A mask function other than
    (sliding-window) causal is classified once per window (`mask_kind`): packed documents
    (`documents`) or a custom mask, which runs dense under transformers' own mask.
    """

    def __init__(self, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, mask_function, device,
                 use_vmap: bool = False):
        self.batch_size = batch_size
        self.q_length = q_length
        self.kv_length = kv_length
        self.kv_offset = kv_offset
        self.mask_function = mask_function
        self.attention_mask = attention_mask
        self.device = device
        self.use_vmap = use_vmap
        self.walk_state: WalkState | list | None = None
        self.decode_row: torch.Tensor | None = None
        self._small_mask: torch.Tensor | None = None
        self._full_mask: torch.Tensor | None = None
        self._kinds: dict = {}
        self.documents: list[tuple[int, int, int]] | None = None
        if isinstance(q_offset, torch.Tensor):
            # A static cache hands over its live counter, which layer 0's cache update then
            # advances in place: keep this forward's value.
            q_offset = q_offset.clone()
        if q_length > SMALL_QUERY:
            # One host sync per forward (transformers' own sdpa mask does the same).
            self.q_offset = int(q_offset)
            key_valid = None
            self.holes = False
            if attention_mask is not None:
                am = self._key_mask()
                live = am[:, : self.q_offset + q_length]  # keys written so far
                if not bool(live.all()):
                    self.holes = has_holes(live)
                    key_valid = am
            self.key_valid = key_valid
        else:
            self.q_offset = q_offset
            self.key_valid = None
            self.holes = False

    def known_offset(self) -> int | None:
        """q_offset as an int; None for one-token steps of a static cache (it stays on the device)."""
        if isinstance(self.q_offset, torch.Tensor):
            if self.q_length == 1:
                return None
            self.q_offset = int(self.q_offset)  # a short prefill: one host sync
        return self.q_offset

    def _key_mask(self) -> torch.Tensor:
        """The 2D padding mask over this forward's kv_length keys, [B, S] bool (unwritten: False)."""
        am = self.attention_mask.to(device=self.device, dtype=torch.bool)
        am = am[:, self.kv_offset : self.kv_offset + self.kv_length]
        if am.shape[-1] < self.kv_length:
            am = torch.nn.functional.pad(am, (0, self.kv_length - am.shape[-1]), value=False)
        return am

    def new_valid(self) -> torch.Tensor | None:
        """[B, L] bool: which of this forward's tokens are real (None: all of them)."""
        if self.attention_mask is None or self.attention_mask.dim() != 2:
            return None
        cols = torch.arange(self.q_length, device=self.device) + self.q_offset - self.kv_offset
        return self._key_mask().index_select(1, cols)

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
            self._small_mask = self.transformers_mask()
        return self._small_mask

    def transformers_mask(self) -> torch.Tensor:
        """The boolean mask transformers' sdpa would use for this forward, [B, 1, L, S]: for a
        few query rows, or for a custom mask function (an n x n tensor, as sdpa builds it)."""
        if self._full_mask is None:
            self._full_mask = sdpa_mask(
                batch_size=self.batch_size,
                q_length=self.q_length,
                kv_length=self.kv_length,
                q_offset=self.q_offset,
                kv_offset=self.kv_offset,
                mask_function=self.mask_function,
                attention_mask=self.attention_mask,
                allow_is_causal_skip=False,
                use_vmap=self.use_vmap,
                device=self.device,
            )
        return self._full_mask

    def mask_kind(self, window: int | None) -> str:
        """"causal" (the mask function is causal, + this window), "packed" (causal inside each of
        several documents packed in a row: `documents` lists them) or "custom" (anything else:
        run under `transformers_mask`).  Found once per forward and window."""
        kind = self._kinds.get(window)
        if kind is None:
            kind = self._kinds[window] = self._classify(window)
            if kind == "custom":
                stats.log_once("custom-mask-function", "flexwalk: this model's mask function is not (sliding-window) "
                               "causal (a bidirectional overlay, chunked attention, ...): its layers run dense "
                               "under transformers' own mask")
        return kind

    def _classify(self, window: int | None) -> str:
        fn = self.mask_function
        if window is None and fn is causal_mask_function:
            return "causal"
        # Every query must see the key before it (in its window): a function that hides it
        # somewhere (a document boundary, a chunk edge) is not causal, wherever the probes fall.
        doc = _document_ids(fn, self)
        if doc is None:
            return "custom"
        if not bool(doc[:, -1].any()):
            return "causal" if _agrees(fn, window, self, None) else "custom"
        # Packed sequences: transformers builds them for a prefill without padding mask or cache.
        packable = (self.attention_mask is None and self.q_offset == 0 and self.kv_offset == 0
                    and self.q_length == self.kv_length)
        if packable and _agrees(fn, window, self, doc):
            if self.documents is None:
                self.documents = _document_spans(doc)
            return "packed"
        return "custom"


def _document_ids(fn, ctx: "SketchWalkMask") -> torch.Tensor | None:
    """[B, L] int: for each query of this forward, how many times so far a query could not see the
    key just before it (a document of packed sequences starts there), read off mask function fn
    with one elementwise call; None if fn cannot be called so (a function written for vmap)."""
    q0 = int(ctx.q_offset)
    i = torch.arange(max(q0, ctx.kv_offset + 1), q0 + ctx.q_length, device=ctx.device)[None, None, None, :]
    b = torch.arange(ctx.batch_size, device=ctx.device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=ctx.device)
    try:
        sees_prev = fn(b, h, i, i - 1).expand(ctx.batch_size, 1, 1, -1).reshape(ctx.batch_size, -1)
    except Exception:
        return None
    starts = torch.nn.functional.pad(~sees_prev, (ctx.q_length - sees_prev.shape[1], 0), value=False)
    return starts.long().cumsum(-1)


def _document_spans(doc: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each document of [B, n] document ids (one host sync)."""
    spans = []
    for row, ids in enumerate(doc.cpu().tolist()):
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1]:
                spans.append((row, start, i))
                start = i
    return spans


def _agrees(fn, window: int | None, ctx: "SketchWalkMask", doc: torch.Tensor | None) -> bool:
    """Whether mask function fn equals causal (+ window) (+ same document, doc [B, n]) on probe
    windows of positions spread over this forward's queries and keys (and around every document
    boundary).  Only positions of this forward are probed: a mask function may index tensors of
    that length (and on CUDA an index out of range is a device-side assert)."""
    span = 24
    w = window if window is not None else 0
    q0 = int(ctx.q_offset)
    q1, k0, k1 = q0 + ctx.q_length, ctx.kv_offset, ctx.kv_offset + ctx.kv_length
    anchors = {q0, q0 + 37, q0 + w + 5, q0 + 2 * w + 101, q0 + 4096 + 3, q1 - span}
    if doc is not None:  # every document boundary too
        starts = (doc[:, 1:] != doc[:, :-1]).any(0).nonzero().flatten().tolist()
        anchors |= {q0 + st + 1 - span // 2 for st in starts[:64]}
    b = torch.arange(ctx.batch_size, device=ctx.device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=ctx.device)
    for a in sorted(anchors):
        qa, qb, ka, kb = max(a, q0), min(a + span, q1), max(a - w - span, k0), min(a + 2 * span, k1)
        if qa >= qb or ka >= kb:
            continue
        q, kv = torch.arange(qa, qb, device=ctx.device), torch.arange(ka, kb, device=ctx.device)
        try:
            got = fn(b, h, q[None, None, :, None], kv[None, None, None, :])
        except Exception:  # a mask function written for vmap only: not one of ours
            return False
        want = (kv[None, :] <= q[:, None])[None, None]
        if window is not None:
            want = want & (kv[None, :] > q[:, None] - window)[None, None]
        if doc is not None:
            want = want & (doc[:, None, q - q0, None] == doc[:, None, None, kv - k0])
        if not torch.equal(got.expand(ctx.batch_size, 1, len(q), len(kv)), want.expand(ctx.batch_size, 1, -1, -1)):
            return False
    return True


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
        attention_mask.decode_row = None
        return attention_mask
    return SketchWalkMask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, mask_function, device,
                          use_vmap=bool(kwargs.get("use_vmap", False)))


def resolve_config(module: torch.nn.Module) -> SketchWalkConfig:
    """The SketchWalkConfig of the model this attention module belongs to, as it was set."""
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


def _tensor_parallel_group(module, query: torch.Tensor):
    """The process group of a tensor-parallel attention layer (tp_plan), or None when this rank
    holds every query head.  Each rank holds an equal share of the heads; the selection's block
    means are all-reduced over this group so that every rank selects what one GPU would."""
    heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    local = query.shape[1]
    if not isinstance(heads, int) or local >= heads:
        return None
    if heads % local:
        raise NotImplementedError(
            f"sketchwalk_flex under tensor parallelism with unequal head shares ({local} of {heads} query heads)")
    degree = heads // local
    import torch.distributed as dist

    group = getattr(module, _GROUP_ATTR, None)
    if group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() == degree:
        group = dist.group.WORLD  # tp_plan="auto" shards over the whole world by default
    if group is None or dist.get_world_size(group) != degree:
        raise NotImplementedError(
            f"sketchwalk_flex under tensor parallelism: this rank holds {local} of {heads} query heads and no "
            f"process group of {degree} ranks was found (the default world has "
            f"{dist.get_world_size() if dist.is_available() and dist.is_initialized() else 'no'} ranks); call "
            "flexwalk.configure(model) after from_pretrained(..., tp_plan=...) so the model's device mesh is used")
    return group  # sparse decode with per-head scoring is refused by DecodeState itself


def _mesh_group(model: torch.nn.Module):
    """The tensor-parallel process group of a model loaded with tp_plan (its device mesh), or None."""
    mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
    if mesh is None:
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tp" in names:
        return mesh.get_group("tp")
    if mesh.ndim == 1:
        return mesh.get_group()
    raise NotImplementedError(f"sketchwalk_flex: a {mesh.ndim}-D device mesh without a 'tp' dimension ({names})")


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
    group = _tensor_parallel_group(module, query)
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
            out = _tracked_small_query(module, cfg, ctx, query, key, value, scaling, softcap, group)
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
        return _packed_attention(cfg, ctx, layer_idx, query, key, value, scaling, softcap, window, group), None
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
        process_group=group,
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


def _packed_attention(cfg, ctx, layer_idx, query, key, value, scaling, softcap, window, group) -> torch.Tensor:
    """Packed sequences (ctx.documents: several documents in a row, transformers' padding-free
    inputs): each document is selected and attended on its own, as one sequence, and carries its
    own walk across the layers (ctx.walk_state: one WalkState per document).  [B, L, Hq, D] out."""
    if layer_idx is None:
        raise NotImplementedError("sketchwalk_flex: packed sequences need the attention module's layer_idx")
    stats.count(stats.PACKED_SEQUENCES)
    out = torch.empty_like(query)
    docs = ctx.documents
    prev = ctx.walk_state if isinstance(ctx.walk_state, list) else [None] * len(docs)
    states = []
    for (row, s0, s1), state in zip(docs, prev):
        part = [t[row : row + 1, :, s0:s1].contiguous() for t in (query, key, value)]
        o, state = sketchwalk_attention(*part, cfg, layer_idx, None if window is not None else state, scale=scaling,
                                        softcap=softcap, window=window, process_group=group)
        out[row : row + 1, :, s0:s1] = o
        states.append(state)
    if window is None:
        ctx.walk_state = states
    return out.transpose(1, 2).contiguous()


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


def _tracked_small_query(module, cfg, ctx, query, key, value, scaling, softcap, group=None) -> torch.Tensor | None:
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
        position=None if offset is not None else ctx.q_offset,
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


def configure(model: torch.nn.Module, config: SketchWalkConfig | dict | str | None = None, *, enable: bool = True):
    """Give `model` its own SketchWalkConfig and (by default) switch it to sketchwalk_flex.

    The config is stored on the model's modules, so two models in one process never share it,
    even when they were built from one config object.  Returns the model.
    """
    cfg = PRESETS["default"] if config is None else coerce_config(config)
    mconf = getattr(model, "config", None)
    if getattr(mconf, "is_encoder_decoder", False):
        raise NotImplementedError("sketchwalk_flex: encoder-decoder models are not supported")
    group = _mesh_group(model)
    for m in model.modules():
        setattr(m, _MODULE_ATTR, cfg)
        setattr(m, _GROUP_ATTR, group)
    if enable and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
