"""The per-forward context of sketchwalk_flex: transformers' mask function returns a
`SketchWalkMask` instead of a mask tensor.  It holds the padding, offsets and the walk state that
sparse layers hand to each other, and classifies the model's mask function (causal, packed
documents, or custom).  Its lifetime is one forward call.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import causal_mask_function, sdpa_mask

from .. import stats
from ..kernels.flex import has_holes
from ..selection.walk import WalkState
from ..varlen import VarlenWalkState

# Queries of at most this many tokens (decode, short continuations) use transformers' own
# mask, built for those rows only ([B, 1, L, S]): exact for every cache layout.
SMALL_QUERY = 32


class SketchWalkMask:
    """Per-forward context returned by the mask function and seen by every layer.

    key_valid: [B, S] bool (False at padding) or None; holes: whether it has padding between
    real tokens.  q_offset: absolute position of the first query (int in prefill, possibly a
    tensor in decode with a static cache).  walk_state: WalkState of the last sparse layer of
    this forward pass (a VarlenWalkState, one walk per document, for packed sequences); decode_row: the
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
        self.walk_state: WalkState | VarlenWalkState | None = None
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
