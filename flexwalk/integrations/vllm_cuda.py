"""vLLM's FlashAttention backend with SketchWalk prefill (vllm_backend.SketchWalkImplMixin), for CUDA.

The plugin registers it as vLLM's CUSTOM backend: `vllm serve MODEL --attention-backend CUSTOM`
(or `LLM(..., attention_config={"backend": "CUSTOM"})`).  Decode, continuation chunks and short
prompts run vLLM's FlashAttention kernels; the cache layout is FlashAttention's.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from .vllm_backend import SketchWalkImplMixin


class SketchWalkFlashAttentionImpl(SketchWalkImplMixin, FlashAttentionImpl):
    pass


class SketchWalkFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SketchWalkFlashAttentionImpl]:
        return SketchWalkFlashAttentionImpl
