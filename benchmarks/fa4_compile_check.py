"""Compile-only check of flexwalk's FlashAttention 4 call, on a machine without a GPU.

FA4 validates a call on the host and compiles its kernel with the CUTLASS DSL, which needs no
GPU; only the launch does.  Under torch's FakeTensorMode, with fake CUDA tensors, FA4 skips the
launch, so this runs `flexwalk.fa4_prefill.sparse_prefill_attention` as the library calls it
(the selection's bucket-wide lists, q / k / v as transposed views) through FA4's checks and its
Hopper (sm_90a) compile, for several shapes and both ways of masking the diagonal
(Options.fa4_mask), and counts the kernels compiled over ten prompt
lengths (FA4's compile key holds no length, so that should be one per shape).  Nothing is
computed: numerics and speed need the GPU run (benchmarks/gpu_fa4.py).

    pip install flash-attn-4==4.0.0b36 nvidia-cutlass-dsl-libs-cu13==4.8.1   # or the cu12 build
    FLASH_ATTENTION_NUM_SMS=132 CUTE_DSL_ARCH=sm_90a python benchmarks/fa4_compile_check.py --out OUT.json

(FLASH_ATTENTION_NUM_SMS: the H100's SM count, which FA4 cannot read without a GPU; CUTE_DSL_ARCH:
the target.)  docs/benchmarks.md 4k.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import flexwalk
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from flexwalk.kernels import fa4 as fa4_prefill  # noqa: E402

# (name, batch, query heads, KV heads, head dim, query block, key block)
CASES = [("llama-8b", 1, 32, 8, 128, 128, 128), ("llama-8b batch 2", 2, 32, 8, 128, 128, 128),
         ("q128 x kv64", 1, 32, 8, 128, 128, 64), ("smollm2-135m", 16, 9, 3, 64, 64, 64),
         ("gemma3-270m", 4, 4, 1, 256, 64, 64)]
LENGTHS = list(range(4100, 5121, 113)) + [131072]


def lists(batch, n, q_block, kv_block, extra_rows=3, extra_cols=2):
    """Block lists as the fused selection leaves them: [B, nq'] / [B, nq', W] over a length bucket
    (nq' and W past what n needs), int32, on the (fake) GPU."""
    nq = -(-n // q_block) + extra_rows
    w = -(-n // kv_block) + extra_cols
    z = dict(dtype=torch.int32, device="cuda")
    return torch.zeros(batch, nq, **z), torch.zeros(batch, nq, w, **z), torch.ones(batch, nq, **z), \
        torch.zeros(batch, nq, w, **z)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--masks", default="causal,mask_mod", help="Options.fa4_mask settings to compile")
    args = ap.parse_args()
    import flash_attn.cute.interface as fa4_interface

    if "FLASH_ATTENTION_NUM_SMS" not in os.environ or "CUTE_DSL_ARCH" not in os.environ:
        sys.exit("set FLASH_ATTENTION_NUM_SMS=132 and CUTE_DSL_ARCH=sm_90a (an H100) to compile without a GPU")
    fa4_interface._get_device_arch = lambda: 90  # what torch.cuda would report on a Hopper GPU
    cache = fa4_interface._flash_attn_fwd.compile_cache.cache
    rows = []
    for mask, (name, batch, hq, hkv, d, qb, kb) in [(m, c) for m in args.masks.split(",") for c in CASES]:
        flexwalk.options.set_options(fa4_mask=mask)
        r = dict(mask=mask, case=name, batch=batch, hq=hq, hkv=hkv, d=d, q_block=qb, kv_block=kb)
        before = len(cache)
        try:
            with FakeTensorMode():
                for i, n in enumerate(LENGTHS):
                    q, k, v = (torch.empty(batch, n, h, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
                               for h in (hq, hkv, hkv))
                    t0 = time.perf_counter()
                    out = fa4_prefill.sparse_prefill_attention(q, k, v, *lists(batch, n, qb, kb), q_block=qb,
                                                               kv_block=kb)
                    if i == 0:
                        r["first_call_s"] = round(time.perf_counter() - t0, 1)
                        r["out_shape"] = list(out.shape)
                        r["out_in_transformers_layout"] = out.transpose(1, 2).is_contiguous()
            r["kernels_compiled"] = len(cache) - before
            r["lengths"] = len(LENGTHS)
        except Exception as e:  # FA4 refused the call or the compile failed: say why
            r["error"] = f"{type(e).__name__}: {e}"[:500]
        print(json.dumps(r), flush=True)
        rows.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(flash_attn_4=_version("flash-attn-4"), cutlass_dsl=_version("nvidia-cutlass-dsl"),
                           torch=torch.__version__, rows=rows), f, indent=1)


def _version(name):
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
