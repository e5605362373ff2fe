"""SketchWalk prefill inside a vLLM attention backend: a mixin over vLLM's own implementation.

`SketchWalkImplMixin` goes before a vLLM `AttentionImpl` in a class's bases (vllm_cpu.py,
vllm_cuda.py).  vLLM writes the paged KV cache itself before each attention call (the impl's
own `do_kv_cache_update`, untouched here), so the cache is exactly what vLLM's backend would
hold.  In `forward`, each request of the batch (rows `query_start_loc[i]:query_start_loc[i+1]`
of the packed query, `seq_lens[i]` tokens in all) takes one path:

- the first chunk of a prompt (no cached prefix: its new tokens are the whole sequence) of at
  least `dense_below` tokens, in a full-attention layer past `dense_layers`: SketchWalk over its
  own new keys and values (`sparse_prefill_requests`), the walk state carried from layer to
  layer of the forward pass on the batch's attention metadata;
- everything else (decode tokens, continuation chunks and prefix-cache hits, short prompts,
  dense and sliding-window layers): vLLM's own attention, counted in `flexwalk.counters()`.

When every request of a batch is sparse, vLLM's attention is not called at all; otherwise it
runs on the whole batch and the sparse requests' rows are then replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import stats
from ..config import SketchWalkConfig
from ..options import current_options
from ..prefill import sketchwalk_attention
from ..selection.walk import WalkState
from .vllm_settings import EngineSettings, current_engine_settings

WALKS_ATTR = "_flexwalk_walks"
"""Attribute of the batch's attention metadata (one object per forward pass, shared by the
layers of a KV-cache group) holding each sparse request's WalkState: {request index: state}."""

FIRST_PREFILL, CONTINUATION, DECODE = "first_prefill", "continuation", "decode"


@dataclass(frozen=True)
class RequestRows:
    """One request of a packed batch: its query rows [start, end) and its sequence length
    (cached tokens plus new ones).  kind: FIRST_PREFILL (no cached prefix), CONTINUATION (new
    tokens after cached ones: a later chunk or a prefix-cache hit) or DECODE (one new token)."""

    index: int
    start: int
    end: int
    seq_len: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def kind(self) -> str:
        if self.length == self.seq_len and self.length > 1:
            return FIRST_PREFILL
        return DECODE if self.length == 1 else CONTINUATION


def batch_requests(query_start_loc: list[int], seq_lens: list[int]) -> list[RequestRows]:
    """The requests of a packed batch from vLLM's metadata (host lists: query_start_loc
    [num_reqs + 1], seq_lens [num_reqs])."""
    return [RequestRows(i, query_start_loc[i], query_start_loc[i + 1], seq_lens[i]) for i in range(len(seq_lens))]


def dense_path(req: RequestRows, config: SketchWalkConfig, layer_idx: int, window: bool,
               device: torch.device) -> str | None:
    """The counter of the dense path vLLM's attention serves this request on, or None when the
    request runs SketchWalk."""
    if req.kind == DECODE:
        return stats.DENSE_DECODE
    if req.kind == CONTINUATION:
        return stats.DENSE_CACHED_PREFILL
    if window:
        return stats.SLIDING_WINDOW
    if layer_idx < config.dense_layer_count:
        return stats.DENSE_LAYER
    if req.length < config.min_sparse_length(device):
        return stats.DENSE_SHORT
    if config.skip_prefill:
        return stats.DENSE_PREFILL
    return None


def sparse_prefill_requests(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                            requests: list[RequestRows], walks: dict[int, WalkState], config: SketchWalkConfig,
                            layer_idx: int, *, scale: float, softcap: float | None, process_group=None,
                            option_fields: dict[str, Any] | None = None) -> None:
    """SketchWalk prefill of whole prompts packed in vLLM's layout, written into `output`.

    query [T, Hq, D], key, value [T, Hkv, D] and output [T, Hq, Dv] hold every request's new
    tokens; each of `requests` (FIRST_PREFILL: its rows are its whole sequence) is attended on
    its own, with walks[request.index] as the previous sparse layer's state (replaced by this
    layer's).  One request at a time through the functional API; a packed (varlen) call can
    replace this loop."""
    opts = current_options(option_fields)
    for req in requests:
        rows = slice(req.start, req.end)
        q = query[rows].transpose(0, 1).unsqueeze(0)
        k = key[rows].transpose(0, 1).unsqueeze(0)
        v = value[rows].transpose(0, 1).unsqueeze(0)
        out, walks[req.index] = sketchwalk_attention(
            q, k, v, config, layer_idx, walks.get(req.index), scale=scale, softcap=softcap,
            process_group=process_group, options=opts)
        output[rows].copy_(out[0].transpose(0, 1))


def layer_index(layer_name: str) -> int:
    """The decoder layer index in a vLLM attention layer's name ("model.layers.7.self_attn.attn" -> 7)."""
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def tensor_parallel_group():
    """vLLM's tensor-parallel process group (each rank holds an equal share of the heads), or
    None without tensor parallelism."""
    from vllm.distributed import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() <= 1:
        return None
    return parallel_state.get_tp_group().device_group


def _host_list(t: torch.Tensor, n: int) -> list[int]:
    return t[:n].tolist()


class SketchWalkImplMixin:
    """Put before a vLLM AttentionImpl in the bases: SketchWalk for the first chunk of long
    prompts, the base implementation for everything else (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sketchwalk: EngineSettings = current_engine_settings()
        if getattr(self, "alibi_slopes", None) is not None:
            raise NotImplementedError("flexwalk vLLM backend: ALiBi is not supported")
        if getattr(self, "sinks", None) is not None:
            raise NotImplementedError("flexwalk vLLM backend: attention sinks are not supported")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        base = super().forward
        call = (layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        if (attn_metadata is None or getattr(self, "attn_type", "decoder") != "decoder"
                or output_scale is not None or output_block_scale is not None
                or getattr(self, "kv_sharing_target_layer_name", None) is not None):
            return base(*call)
        cfg = self.sketchwalk.config
        layer_idx = layer_index(layer.layer_name)
        window = (getattr(self, "sliding_window", None) or -1) not in (-1, (-1, -1))
        num_reqs = attn_metadata.seq_lens.shape[0]
        if attn_metadata.max_query_len <= 1:  # decode only: no host sync
            for _ in range(num_reqs):
                stats.count(stats.DENSE_DECODE)
            return base(*call)
        requests = batch_requests(_host_list(attn_metadata.query_start_loc, num_reqs + 1),
                                  _host_list(attn_metadata.seq_lens, num_reqs))
        sparse = []
        for req in requests:
            path = dense_path(req, cfg, layer_idx, window, query.device)
            if path is None:
                sparse.append(req)
            else:
                stats.count(path)
        if len(sparse) < len(requests):
            base(*call)
        if sparse:
            walks = attn_metadata.__dict__.setdefault(WALKS_ATTR, {})
            softcap = getattr(self, "logits_soft_cap", None) or None
            sparse_prefill_requests(query, key, value, output, sparse, walks, cfg, layer_idx, scale=self.scale,
                                    softcap=softcap, process_group=tensor_parallel_group(),
                                    option_fields=self.sketchwalk.option_fields())
        return output
