"""sketchwalk_attention on CUDA in every dtype, head dim and block size, against SDPA and the oracle.

    OUT=/tmp/dtypes python -m pytest -q -s tests/gpu/test_dtypes.py     # needs a CUDA GPU

Each combination of dtype (float32, float16, bfloat16), head dim (64, 128, 256), block size
(64, 128; query block = key block), prompt length (FLEXWALK_DTYPE_LENGTHS, default 4096 and
5000: a length off the block grid) and prefill kernel setting (attention.PREFILL_KERNEL "auto",
and "triton", which runs flexwalk's Triton kernel wherever `triton_prefill.supported` allows)
is a test of its own, so that one failure hides no other.  Batch 2, 8 query heads over 2
key/value heads (GQA 4:1).  Two checks each:

- full: density 1.0 (every causal block kept) against torch SDPA with is_causal=True;
- oracle: the default density (0.2), two layers with the walk carried, against the eager oracle
  (flexwalk.reference: the same selection as a token mask, through SDPA).

The error allowed is the dtype's reference error, as in the CPU tests (flexwalk.reference.error_budget:
twice the error of the same reference computed in the dtype, against float64, plus 4 ulps).
Each test prints one line: the kernel that ran (flexwalk.counters(): fa4_prefill, triton_prefill,
else flex), the Triton launch (tiles, stages) with the shared memory the formula gives and the
one the compiled kernel reports, the max error and its budget.  With OUT set, every line so far
is also written to $OUT/dtypes.json after each test.  CPU runs skip it all.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib

import pytest
import torch
import torch.nn.functional as F

import flexwalk
from flexwalk import SketchWalkConfig, eager_sketchwalk_attention, sketchwalk_attention, token_mask
from flexwalk.reference import error_budget, reference_error_budget
from flexwalk.kernels import triton_prefill as TP

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = [64, 128, 256]
BLOCKS = [64, 128]
LENGTHS = [int(x) for x in os.environ.get("FLEXWALK_DTYPE_LENGTHS", "4096,5000").split(",")]
KERNELS = ["auto", "triton"]
BATCH, HQ, HKV = 2, 8, 2
DEVICE = "cuda"

_ROWS: list[dict] = []


def _record(row: dict) -> None:
    _ROWS.append(row)
    launch = row.get("launch")
    tiles = (f" tiles={launch['BLOCK_M']}x{launch['BLOCK_N']} warps={launch['num_warps']} "
             f"stages={launch['num_stages']} smem={launch['smem_formula']}/{launch['smem_compiled']}") if launch else ""
    print(f"\n{row['check']:6} {row['dtype']} d={row['head_dim']} block={row['block']} n={row['n']} "
          f"setting={row['setting']} ran={row.get('kernel')}{tiles} err={row.get('err', float('nan')):.3e} "
          f"budget={row.get('budget', float('nan')):.3e} ok={row['ok']}" + (f" error={row['error']}" if "error" in row
                                                                             else ""), flush=True)
    out = os.environ.get("OUT")
    if out:
        path = pathlib.Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "dtypes.json").write_text(json.dumps(_ROWS, indent=1))


def _kernel_ran() -> str:
    c = flexwalk.counters()
    return "fa4_prefill" if c.get("fa4_prefill") else "triton_prefill" if c.get("triton_prefill") else "flex"


def _inputs(n, d, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = lambda h: (BATCH, h, n, d)  # noqa: E731
    return tuple(torch.randn(shape(h), device=DEVICE, generator=g).to(dtype) for h in (HQ, HKV, HKV))


def _launch(launches: list[dict], dtype, d) -> dict | None:
    if not launches:
        return None
    kw = launches[-1]
    keep = {k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "M_SPLIT", "num_warps", "num_stages")}
    keep["smem_formula"] = TP.shared_memory(dtype, d, kw["BLOCK_M"], kw["BLOCK_N"], kw["num_stages"])
    keep["smem_compiled"] = kw["shared"]
    return keep


def _run(check, name, d, block, n, setting, body):
    """Runs body() -> (err, budget, extra) under the kernel setting; records the line (also when
    body raises), then asserts."""
    dtype = DTYPES[name]
    row = dict(check=check, dtype=name, head_dim=d, block=block, n=n, setting=setting, batch=BATCH, hq=HQ, hkv=HKV)
    flexwalk.reset_counters()
    with flexwalk.options(prefill_kernel=setting), flexwalk.stats.launch_log() as launches:
        try:
            err, budget, extra = body(dtype)
            row.update(kernel=_kernel_ran(), launch=_launch(launches, dtype, d), err=err, budget=budget, **extra)
            row["ok"] = bool(err <= budget and extra.get("finite", True) and extra.get("same_selection", True))
        except Exception as e:
            row.update(kernel=_kernel_ran(), launch=_launch(launches, dtype, d), ok=False,
                       error=f"{type(e).__name__}: {e}"[:500])
            _record(row)
            raise
        finally:
            torch.cuda.empty_cache()
    _record(row)
    if setting == "triton" and TP.supported(torch.empty(1, 1, 1, d, dtype=dtype, device=DEVICE), q_block=block,
                                            kv_block=block):
        assert row["kernel"] == "triton_prefill", row
    assert row["ok"], row


COMBOS = list(itertools.product(DTYPES, HEAD_DIMS, BLOCKS, LENGTHS, KERNELS))
_grid = pytest.mark.parametrize("name,d,block,n,setting", COMBOS,
                                ids=[f"{a}-d{b}-block{c}-n{e}-{f}" for a, b, c, e, f in COMBOS])


@_grid
def test_full_budget_equals_sdpa(name, d, block, n, setting):
    def body(dtype):
        q, k, v = _inputs(n, d, dtype, seed=d + block + n)
        cfg = SketchWalkConfig(block_size=block, density=1.0, dense_layers=0, dense_below=0)
        out, _ = sketchwalk_attention(q, k, v, cfg, 0)
        ref_lp = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ref_hp = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
        err, budget = error_budget(out, ref_lp, ref_hp)
        return err, budget, dict(finite=bool(torch.isfinite(out).all()))

    _run("full", name, d, block, n, setting, body)


@_grid
def test_default_density_equals_the_oracle(name, d, block, n, setting):
    def body(dtype):
        q, k, v = _inputs(n, d, dtype, seed=3 * d + block + n)
        cfg = SketchWalkConfig(block_size=block, dense_layers=0, dense_below=0)
        st_f = st_o = None
        worst, extra = None, dict(finite=True, same_selection=True, density=[])
        for layer in range(2):
            out, st_f = sketchwalk_attention(q, k, v, cfg, layer, st_f)
            _, st_o, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, st_o)
            err, budget = reference_error_budget(q, k, v, token_mask(n, selection=sel), out)
            if worst is None or err / budget > worst[0] / worst[1]:
                worst = (err, budget)
            # the graphed Triton selection and the eager one sum in other orders: walks agree to fp32 rounding
            # (the fast path's walk may span the length bucket's blocks: compare the real ones)
            nb = st_o.transition.shape[-1]
            walk = st_f.transition[..., :nb, :nb]
            extra["same_selection"] &= bool(torch.allclose(walk, st_o.transition, rtol=0, atol=1e-6))
            extra["finite"] &= bool(torch.isfinite(out).all())
            extra["density"].append(round(sel.density(), 4))
        return worst[0], worst[1], extra

    _run("oracle", name, d, block, n, setting, body)
