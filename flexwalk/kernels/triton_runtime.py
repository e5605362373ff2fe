"""What every Triton kernel of flexwalk shares: whether triton is installed, whether it runs in
its interpreter (CPU tensors, the tests), the log2 constant of the exp2 softmaxes and the shared
memory a launch may use on a device."""

from __future__ import annotations

import functools

import torch

try:  # triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

LOG2E = 1.4426950408889634
"""log2(e): the kernels' softmaxes run in base 2 (exp2), their scores scaled by it."""

HOPPER_SMEM = 232448
"""Shared memory per thread block on Hopper (H100, H200: 227 KiB with the opt-in): the budget of
interpreted (CPU) runs, so that the tests check what an H100 would launch."""


def interpreted() -> bool:
    """True when triton runs kernels in its interpreter (TRITON_INTERPRET=1 set before import)."""
    return HAS_TRITON and bool(getattr(getattr(triton, "knobs", None), "runtime", None)
                               and triton.knobs.runtime.interpret)


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index`."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def smem_bytes(index: int) -> int:
    """Shared memory per thread block of CUDA device `index` with the opt-in (99 KiB if unreported)."""
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024


def device_smem(device: torch.device) -> int:
    """Shared memory per thread block that a launch on `device` may use: the CUDA device's
    opt-in limit, HOPPER_SMEM elsewhere (the interpreter: CPU tests check the Hopper limit)."""
    return smem_bytes(device.index or 0) if device.type == "cuda" else HOPPER_SMEM
