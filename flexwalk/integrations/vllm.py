"""vLLM plugin: SketchWalk prefill inside vLLM's attention backends.

`pip install "flexwalk[vllm]"` installs the `vllm.general_plugins` entry point `flexwalk =
flexwalk.integrations.vllm:register`, which vLLM runs in every process it starts (engine,
workers).  `register` validates the environment's settings (vllm_settings: a bad
FLEXWALK_CONFIG stops the start-up, naming the field) and registers the backends:

- CPU: vLLM's CPU platform always selects CPU_ATTN, so CPU_ATTN is overridden with
  vllm_cpu.SketchWalkCPUBackend (vLLM's CPU implementation plus the sparse prefill);
- CUDA: vllm_cuda.SketchWalkFlashAttentionBackend is registered as CUSTOM, taken with
  `--attention-backend CUSTOM`.

The engine runs in other processes than the caller's: with `worker_extension_cls=WORKER_EXTENSION`,
`llm.collective_rpc("flexwalk_counters")` reads `flexwalk.counters()` in each worker.
"""

from __future__ import annotations

from .. import stats
from .vllm_settings import environment_settings

CPU_BACKEND = "flexwalk.integrations.vllm_cpu.SketchWalkCPUBackend"
CUDA_BACKEND = "flexwalk.integrations.vllm_cuda.SketchWalkFlashAttentionBackend"


def register() -> None:
    """The plugin's entry point (idempotent: vLLM may call it more than once per process)."""
    environment_settings()  # fails here, at start-up, on an invalid FLEXWALK_CONFIG / FLEXWALK_OPTIONS
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    else:
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)


WORKER_EXTENSION = "flexwalk.integrations.vllm.CountersExtension"
"""Pass as `LLM(..., worker_extension_cls=WORKER_EXTENSION)` (`--worker-extension-cls` of
`vllm serve`) to read flexwalk's counters of each worker with `llm.collective_rpc`."""


class CountersExtension:
    """Methods vLLM adds to its workers: `llm.collective_rpc("flexwalk_counters")` returns
    `flexwalk.counters()` of every worker process (one dict per worker)."""

    def flexwalk_counters(self) -> dict[str, int]:
        return stats.counters()

    def flexwalk_reset_counters(self) -> None:
        stats.reset_counters()

    def flexwalk_density_report(self) -> dict[str, float]:
        """`flexwalk.density_report()` of the worker, keyed by the layer index as a string."""
        return {str(layer): d for layer, d in stats.density_report().items()}
