"""vLLM's CPU attention backend with SketchWalk prefill (vllm_backend.SketchWalkImplMixin).

vLLM's CPU platform always selects CPU_ATTN, whatever backend is asked for, so the plugin
registers this class under CPU_ATTN: everything but the sparse prefill runs vLLM's CPU kernels.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .vllm_backend import SketchWalkImplMixin


class SketchWalkCPUImpl(SketchWalkImplMixin, CPUAttentionBackendImpl):
    pass


class SketchWalkCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SketchWalkCPUImpl]:
        return SketchWalkCPUImpl
