"""Block-sparse prefill through FlashAttention 4's CuTe kernels (`flash_attn.cute`), where installed.

FlashAttention 4 (`pip install flash-attn-4`, Hopper and Blackwell; imported as
`flash_attn.cute`) runs a block-sparse pattern given, per query tile, two lists of key blocks:
"mask" blocks, where a mask is applied (here FA4's own causal mask and sequence end), and "full"
blocks, where none is.  A SketchWalk selection produces exactly these lists (the BlockMask's
partial and full blocks; `selection.driver.fused_selection`'s tables), so this module hands them over
unchanged: the partial blocks of a selection without padding are the causal diagonal, which FA4
masks itself (`causal=True`, Options.fa4_mask="causal") or through a two-line CuTe mask function
(fa4_mask="mask_mod").

What it does not handle, so that `prefill.sparse_prefill` runs flexwalk's Triton kernel or
flex instead (see `supported`): padded batches (keys outside [start, end) per row), the
residual's summary keys, soft-capping, gradients, query lengths other than the
key length, dtypes other than bf16 / fp16, and shapes outside SHAPES (those measured faster than
flexwalk's other kernels on an H100).  On an H100 (docs/benchmarks.md 4l) it matched
the Triton kernel and flex to bf16 rounding and ran the 8B shape's 20% attention 1.40x faster
than the Triton kernel at 128K, which took the 8B-shaped model's TTFT at 128K from 1.89x to
2.10x sdpa's; Options.fa4_auto is on since.  The CPU tests run the wiring through a
stand-in that implements FA4's block-sparse semantics (tests/test_fa4_prefill.py).

The inputs stay in transformers' layout: q [B, Hq, n, D] and k, v [B, Hkv, n, D] are passed as
their [B, n, H, D] transposed views (FA4 reads any strides with a contiguous head dim), and
FA4's output, [B, n, Hq, D], is what the attention interface returns; it is handed back as a
[B, Hq, n, D] view, like `triton_prefill.sparse_prefill_attention`'s.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from ..stats import log_once

# (head dim, query block, key block) where FA4 runs: those where it was faster than the Triton kernel
# and flex on an H100 at 20% (docs/benchmarks.md 4l): 128 x 128 (1.40x the Triton kernel at 128K),
# 128 with 64 x 64 blocks (2.2x the Triton kernel, 1.5x flex at 32K) and Gemma 3's 256 with 64 x 64
# (1.3x flex).  Not head dim 64 (SmolLM2): there FA4 was 0.66x flex and 0.77x the Triton kernel.
SHAPES = {(128, 128, 128), (128, 64, 64), (256, 64, 64)}
# Compute capabilities (major) where FA4's block-sparse query block equals one 128-row tile.
# Blackwell (10.x) runs two tiles per CTA, so its query block would be 256 rows: not used.
ARCHS = {9}
@functools.lru_cache(maxsize=1)
def causal_mask_mod():
    """kv <= q as a CuTe mask function (FA4's signature: batch, head, q, kv, seqlen info, aux)."""
    import cutlass.cute as cute

    @cute.jit
    def causal(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        return n_idx <= m_idx

    return causal


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether `flash_attn.cute` (FlashAttention 4) imports; cached.  An installed FA4 whose import
    fails (a missing or mismatched dependency, e.g. a CUTLASS DSL without its `cutlass.cute`
    package) is not used: logged once with the error, the Triton kernel or flex runs instead."""
    try:
        if importlib.util.find_spec("flash_attn.cute") is None:
            return False
    except (ImportError, ValueError):  # no flash_attn package at all, or a broken one
        return False
    try:
        importlib.import_module("flash_attn.cute")
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party import means "not available"
        log_once("fa4_import_failed", "flexwalk: flash_attn.cute (FlashAttention 4) is installed but does not import "
                 "(%s: %s); the Triton kernel or flex runs instead", type(exc).__name__, exc)
        return False
    return True


@functools.lru_cache(maxsize=8)
def _arch(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def device_ok(device: torch.device, on_cpu: bool = False) -> bool:
    """A CUDA device whose architecture is in ARCHS; with on_cpu, the CPU too (Options.fa4_on_cpu:
    the tests run the wiring through a stand-in of flash_attn.cute)."""
    if device.type != "cuda":
        return on_cpu and device.type == "cpu"
    return _arch(device.index if device.index is not None else torch.cuda.current_device()) in ARCHS


def supported(q: torch.Tensor, k: torch.Tensor, *, q_block: int, kv_block: int, softcap=None,
              padded: bool = False, shapes=None, on_cpu: bool = False) -> bool:
    """Whether `sparse_prefill_attention` handles this call (see the module docstring).
    shapes: the (head dim, query block, key block) shapes to run (None: SHAPES); on_cpu: see
    `device_ok`."""
    return (device_ok(q.device, on_cpu) and available() and not padded and softcap is None
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[2] == k.shape[2]
            and (q.shape[-1], q_block, kv_block) in (SHAPES if shapes is None else shapes))


def block_sparse_lists(
    full_num: torch.Tensor,
    full_idx: torch.Tensor,
    part_num: torch.Tensor,
    part_idx: torch.Tensor,
    n: int,
    q_block: int,
    kv_block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A selection's block lists in FA4's form: (mask_cnt [B, 1, nq], mask_idx [B, 1, nq, W],
    full_cnt [B, 1, nq], full_idx [B, 1, nq, W']), int32, nq = ceil(n / q_block), W and W' at
    most nk = ceil(n / kv_block).

    full_num / part_num: [B, nq'] or [B, 1, nq'] counts, full_idx / part_idx: [B, nq', W] or
    [B, 1, nq', W] indices (a BlockMask's, or `fused_selection`'s tables, nq' >= nq: rows of a
    length bucket past n are dropped; columns past nk too, which FA4 refuses and no count
    reaches, as a row keeps at most its causal blocks).  The head dimension stays 1: FA4
    broadcasts it, as every head of a layer shares the selection.  Views where the input
    already is int32."""
    nq, nk = -(-n // q_block), -(-n // kv_block)

    def rows(t: torch.Tensor, ndim: int) -> torch.Tensor:
        if t.dim() == ndim - 1:
            t = t.unsqueeze(1)
        if t.dim() != ndim or t.shape[1] != 1:
            raise ValueError(f"block lists: expected [B, nq] / [B, nq, W] or a BlockMask's [B, 1, ...] tensors, "
                             f"got shape {tuple(t.shape)}")
        if t.shape[2] < nq:
            raise ValueError(f"block lists: {t.shape[2]} query blocks cover fewer than the {nq} of {n} tokens")
        t = t.narrow(2, 0, nq)  # narrow, not indexing: it also traces under fake CUDA tensors
        return (t if ndim == 3 else t.narrow(3, 0, min(nk, t.shape[3]))).to(torch.int32)

    return rows(part_num, 3), rows(part_idx, 4), rows(full_num, 3), rows(full_idx, 4)


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    full_num: torch.Tensor,
    full_idx: torch.Tensor,
    part_num: torch.Tensor,
    part_idx: torch.Tensor,
    *,
    q_block: int,
    kv_block: int,
    scale: float | None = None,
    mask: str = "causal",
) -> torch.Tensor:
    """Causal attention of q over the listed key blocks, by FlashAttention 4.

    q: [B, Hq, n, D]; k, v: [B, Hkv, n, D]; the block lists as in `block_sparse_lists` (partial
    blocks get the causal mask, full blocks none).  mask: how the diagonal blocks are masked,
    "causal" (FA4's causal=True: its own row-limit mask, also applied, to no effect, on every
    full block, and its longest-first tile order) or "mask_mod" (causal=False with a CuTe mask
    function on the partial blocks only: full blocks unmasked, but FA4's tile order is then not
    longest-first); which is faster is a GPU measurement (Options.fa4_mask).  Returns [B, Hq, n, D], a view of FA4's
    [B, n, Hq, D] output."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    mc, mi, fc, fi = block_sparse_lists(full_num, full_idx, part_num, part_idx, q.shape[2], q_block, kv_block)
    lists = BlockSparseTensorsTorch(mask_block_cnt=mc, mask_block_idx=mi, full_block_cnt=fc, full_block_idx=fi,
                                    block_size=(q_block, kv_block))
    if mask not in ("causal", "mask_mod"):
        raise ValueError(f"mask={mask!r} is invalid: allowed causal, mask_mod")
    how = dict(causal=True) if mask == "causal" else dict(causal=False, mask_mod=causal_mask_mod())
    res = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          block_sparse_tensors=lists, **how)
    out = res[0] if isinstance(res, tuple) else res
    return out.transpose(1, 2)
