"""SketchWalk prefill inside a vLLM attention backend: a mixin over vLLM's own implementation.

`SketchWalkImplMixin` goes before a vLLM `AttentionImpl` in a class's bases (vllm_cpu.py,
vllm_cuda.py).  vLLM writes the paged KV cache itself before each attention call (the impl's
own `do_kv_cache_update`, untouched here), so the cache is exactly what vLLM's backend would
hold.  In `forward`, each request of the batch (rows `query_start_loc[i]:query_start_loc[i+1]`
of the packed query, `seq_lens[i]` tokens in all) takes one path:

- the first chunk of a prompt (no cached prefix: its new tokens are the whole sequence) of at
  least `dense_below` tokens, in a full-attention layer past `dense_layers`: SketchWalk over its
  own new keys and values.  These requests' rows go to one `sketchwalk_varlen_attention` call
  per layer (`sparse_prefill_requests`), whose VarlenWalkState is carried from layer to layer
  of the forward pass on the batch's attention metadata;
- everything else (decode tokens, continuation chunks and prefix-cache hits, short prompts,
  dense and sliding-window layers): vLLM's own attention, counted in `flexwalk.counters()`.

When every request of a batch is sparse, vLLM's attention is not called at all; otherwise it
runs on the whole batch and the sparse requests' rows are then replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from .. import stats
from ..config import SketchWalkConfig
from ..options import current_options
from ..varlen import VarlenWalkState, sketchwalk_varlen_attention
from .vllm_settings import EngineSettings, current_engine_settings

WALKS_ATTR = "_flexwalk_walks"
"""Attribute of the batch's attention metadata (one object per forward pass, shared by the
layers of a KV-cache group) holding the sparse requests' VarlenWalkState of the last sparse layer."""

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
                            requests: list[RequestRows], state: VarlenWalkState | None, config: SketchWalkConfig,
                            layer_idx: int, *, scale: float, softcap: float | None, process_group=None,
                            option_fields: dict[str, Any] | None = None) -> VarlenWalkState | None:
    """SketchWalk prefill of whole prompts packed in vLLM's layout, written into `output`.

    query [T, Hq, D], key, value [T, Hkv, D] and output [T, Hq, Dv] hold every request's new
    tokens; `requests` (FIRST_PREFILL: each one's rows are its whole sequence, in batch order)
    run as the sequences of one `sketchwalk_varlen_attention` call, each selected on its own.
    Their rows are gathered when other requests sit between them and the output scattered back
    to them; the rows of the other requests are not touched.  state: the previous sparse
    layer's VarlenWalkState of these requests (None for the first); returns this layer's."""
    lengths = [req.length for req in requests]
    cu_seqlens = torch.tensor(list(accumulate(lengths, initial=0)), dtype=torch.int32)  # host tensor: no sync
    first, last = requests[0].start, requests[-1].end
    if last - first == sum(lengths):  # contiguous rows: views, no copy
        rows = slice(first, last)
        q, k, v = query[rows], key[rows], value[rows]
    else:
        rows = torch.cat([torch.arange(req.start, req.end) for req in requests]).to(query.device)
        q, k, v = (t.index_select(0, rows) for t in (query, key, value))
    out, state = sketchwalk_varlen_attention(
        q, k, v, cu_seqlens, max(lengths), config, layer_idx, state, scale=scale, softcap=softcap,
        process_group=process_group, options=current_options(option_fields))
    output[rows] = out.to(output.dtype)
    return state


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
            softcap = getattr(self, "logits_soft_cap", None) or None
            state = attn_metadata.__dict__.get(WALKS_ATTR)  # the previous sparse layer's, this forward pass
            state = sparse_prefill_requests(query, key, value, output, sparse, state, cfg, layer_idx, scale=self.scale,
                                            softcap=softcap, process_group=tensor_parallel_group(),
                                            option_fields=self.sketchwalk.option_fields())
            attn_metadata.__dict__[WALKS_ATTR] = state
        return output
