"""Shared memory of the Triton kernels' launches against Hopper's limit, checked on the CPU.

Triton's interpreter, which runs the kernels in these tests, has no shared-memory limit: a
launch too large for the GPU passes every CPU test and fails only on the device, with
`OutOfResources: shared memory` (float32 at head dim 128 with 128-token blocks needed 393216
bytes on an H200, whose limit is 232448).  So the prefill kernel chooses its tiles per dtype
from one formula (`triton_prefill.shared_memory`), and these tests check that formula against
what Triton compiled for sm_90, that every configuration chosen fits the Hopper limit with its
margin, that a launch nothing fits is refused by `supported` (the caller then runs flex), and
that the float32 tiles compute the right thing.  The decode kernel's tiling gets the same check.
The selection kernels need no such care: no tile of theirs lives in shared memory (Triton 3.6
gives them at most 1 KiB, for reductions, at every head dim up to 256 and 4096 blocks per row).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import flexwalk
from conftest import assert_matches_reference, random_qkv
from flexwalk import SketchWalkConfig, eager_sketchwalk_attention, sketchwalk_attention, token_mask
from flexwalk.kernels import triton_decode as TD
from flexwalk.kernels import triton_prefill as TP
from flexwalk.kernels.triton_runtime import HOPPER_SMEM
from flexwalk.prefill import prefill_kernel

pytestmark = pytest.mark.skipif(not TP.HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128, 256]
BLOCKS = [(64, 64), (128, 64), (128, 128), (256, 64), (256, 128), (256, 256)]  # (query block, key block)
BUDGET = TP.HOPPER_SMEM - TP.SMEM_MARGIN
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPES = {v: k for k, v in _NAMES.items()}

# What Triton 3.6 allocated for the prefill kernel on sm_90 (metadata "shared", bytes):
# (dtype, head dim, BLOCK_M, BLOCK_N, num_stages, residual) -> bytes.  The 16-bit launches and
# the float32 launches marked "H100" ran on an H100 (tests/gpu/test_dtypes.py: torch 2.11,
# Triton 3.6); the others were compiled for sm_90 without a GPU, pointers and strides specialised
# as a launch specialises them (test_the_compiler_agrees, FLEXWALK_COMPILE_SM90=1, does it again).
COMPILED_SM90 = {
    ("fp32", 128, 128, 128, 3, False): 393216,  # the H200's report
    ("fp32", 128, 128, 128, 2, False): 262144,
    ("fp32", 128, 128, 128, 1, False): 196608,
    ("fp32", 128, 128, 64, 3, False): 229888,
    ("fp32", 128, 128, 64, 3, True): 230400,
    ("fp32", 128, 128, 64, 2, False): 164352,  # H100
    ("fp32", 128, 128, 64, 2, True): 164608,
    ("fp32", 128, 64, 64, 3, False): 180480,  # H100
    ("fp32", 64, 128, 128, 4, False): 295424,
    ("fp32", 64, 128, 128, 3, False): 229888,
    ("fp32", 64, 128, 128, 3, True): 230912,
    ("fp32", 64, 128, 128, 2, False): 164352,  # H100
    ("fp32", 64, 128, 128, 2, True): 164864,
    ("fp32", 64, 128, 128, 1, False): 131584,
    ("fp32", 64, 128, 64, 3, False): 131072,
    ("fp32", 64, 64, 64, 3, False): 98304,  # H100
    ("fp32", 64, 64, 32, 4, False): 73984,
    ("fp32", 64, 32, 32, 1, False): 20608,
    ("fp32", 256, 64, 32, 2, False): 139520,  # H100
    ("fp32", 256, 64, 32, 2, True): 139648,
    ("bf16", 128, 128, 128, 3, False): 229376,
    ("bf16", 128, 128, 128, 3, True): 230400,
    ("bf16", 64, 128, 128, 3, True): 115840,
    ("bf16", 128, 64, 64, 3, False): 114688,
    ("bf16", 64, 128, 128, 3, False): 114688,
    ("bf16", 64, 64, 64, 3, False): 57344,
    ("bf16", 256, 64, 32, 2, False): 98304,
    ("fp16", 128, 128, 128, 3, False): 229376,
    ("fp16", 128, 64, 64, 3, False): 114688,
    ("fp16", 64, 128, 128, 3, False): 114688,
    ("fp16", 64, 64, 64, 3, False): 57344,
    ("fp16", 256, 64, 32, 2, False): 98304,
    ("fp16", 256, 64, 32, 2, True): 98432,
}

# The same for the decode split kernel, compiled for sm_90 without a GPU: (dtype, head dim,
# BLOCK_G, SUB_N, num_stages) -> bytes, at the tiles `tiling` chose for blocks of 16-256 tokens.
COMPILED_SM90_DECODE = {
    ("fp32", 64, 16, 16, 3): 21504,
    ("fp32", 64, 32, 128, 3): 155776,
    ("fp32", 128, 16, 64, 3): 143424,
    ("fp32", 128, 32, 32, 3): 86016,
    ("fp32", 256, 16, 32, 3): 149568,
    ("fp32", 256, 32, 32, 3): 168064,
    ("fp32", 256, 32, 16, 3): 100480,
}


def _tiles_launch(dtype, d, q_block, kv_block):
    """The launch TILES alone gives (what ran before tiles were chosen per dtype)."""
    bn, warps, stages = TP.TILES[d]
    return min(q_block, 128 if d <= 128 else 64), min(bn, kv_block), warps, stages


def test_the_formula_reproduces_the_h200_report():
    """float32, head dim 128, 128 x 128 tiles, 3 stages: 64 KiB of Q, 2 x (64 + 64) of K and V
    in flight, 64 of P = 393216 bytes, what the H200 refused; the launches that ran there
    (bfloat16 at blocks 64 and 128, float32 at block 64, all at head dim 128) fit."""
    assert TP.shared_memory(torch.float32, 128, 128, 128, 3) == 393216 > TP.HOPPER_SMEM
    for dtype, block in ((torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64)):
        bm, bn, _, stages = _tiles_launch(dtype, 128, block, block)
        assert TP.shared_memory(dtype, 128, bm, bn, stages) <= BUDGET, (dtype, block)


@pytest.mark.parametrize("key", sorted(COMPILED_SM90), ids=lambda k: "-".join(map(str, k)))
def test_the_formula_against_triton_sm90(key):
    """What Triton allocated is the formula, or a few BLOCK_M-sized vectors more (the row
    statistics' conversions; with the residual up to 1536 bytes), always within SMEM_MARGIN."""
    name, d, bm, bn, stages, _residual = key
    compiled = COMPILED_SM90[key]
    need = TP.shared_memory(_DTYPES[name], d, bm, bn, stages)
    assert need <= compiled <= need + TP.SMEM_MARGIN


@pytest.mark.parametrize("q_block,kv_block", BLOCKS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: _NAMES[t])
def test_the_chosen_launch_fits_hopper(dtype, d, q_block, kv_block):
    """Every supported dtype, head dim and block pair: the launch `sparse_prefill_attention` would
    make on an H100 / H200 fits 227 KiB less the margin, its tiles divide the mask's blocks and
    keep the pipeline (>= 2 stages); `supported` accepts it.  16-bit dtypes launch TILES' tiles
    unchanged (the ones measured); where those would not fit (float32), smaller ones run."""
    cfg = TP.launch_config(dtype, d, q_block, kv_block)
    assert cfg is not None
    bm, bn, warps, stages = cfg
    need = TP.shared_memory(dtype, d, bm, bn, stages)
    assert need <= BUDGET, (cfg, need)
    assert q_block % bm == 0 and kv_block % bn == 0 and bm >= 16 and bn >= 16 and stages >= 2
    assert TP.supported(torch.empty(1, 1, 1, d, dtype=dtype), q_block=q_block, kv_block=kv_block)
    before = _tiles_launch(dtype, d, q_block, kv_block)
    before_need = TP.shared_memory(dtype, d, before[0], before[1], before[3])
    if before_need <= BUDGET:
        assert cfg == before
    else:
        assert dtype == torch.float32 and need < before_need and bm == before[0]
    if dtype != torch.float32:
        assert cfg == before


def test_float32_launches():
    """The float32 launches, spelled out (BLOCK_M, BLOCK_N, warps, stages): fewer stages first,
    then narrower key tiles; the query tile stays the mask's query block (at most 128 rows)."""
    f32 = torch.float32
    assert TP.launch_config(f32, 128, 128, 128) == (128, 64, 8, 3)  # 229376 bytes; was 128 x 128 x 3: 393216
    assert TP.launch_config(f32, 128, 64, 64) == (64, 64, 8, 3)  # 180224: unchanged
    assert TP.launch_config(f32, 64, 128, 128) == (128, 128, 4, 3)  # 229376: unchanged
    assert TP.launch_config(f32, 64, 64, 64) == (64, 64, 4, 3)  # 98304: unchanged
    assert TP.launch_config(f32, 256, 128, 128) == (64, 32, 8, 2)  # 139264: unchanged


@pytest.mark.parametrize("smem", [TP.HOPPER_SMEM, 166912, 101376, 65536, 49152, 24576, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: _NAMES[t])
def test_launches_that_do_not_fit_are_refused(dtype, smem):
    """With a device's shared memory of `smem` bytes (Hopper, A100, consumer cards, smaller):
    `supported` says yes exactly where some launch fits smem less the margin, and the launch
    chosen then fits; where none does, `supported` is False before anything is launched."""
    for d in HEAD_DIMS:
        q = torch.empty(1, 1, 1, d, dtype=dtype)
        for q_block, kv_block in BLOCKS:
            cfg = TP.launch_config(dtype, d, q_block, kv_block, smem)
            smallest = TP.shared_memory(dtype, d, 16, 16, 1)
            assert TP.supported(q, q_block=q_block, kv_block=kv_block, smem=smem) == (cfg is not None)
            assert (cfg is None) == (smallest > smem - TP.SMEM_MARGIN)
            if cfg is not None:
                assert TP.shared_memory(dtype, d, cfg[0], cfg[1], cfg[3]) <= smem - TP.SMEM_MARGIN


def test_a_refused_launch_falls_back_to_flex():
    """Where no tile fits, the caller runs flex even with PREFILL_KERNEL = "triton", and the
    kernel itself raises a ValueError naming the shared memory instead of launching."""
    cfg = SketchWalkConfig(block_size=16, density=0.5, dense_layers=0, dense_below=0, sketch_dim=16)
    q, k, v = random_qkv(1, 2, 1, 64, 16, seed=4)
    with flexwalk.options(prefill_kernel="triton"):
        assert prefill_kernel(q, k, v, cfg) == "triton"
    small = TP.SMEM_MARGIN + 1024
    with flexwalk.options(prefill_kernel="triton", triton_smem_limit=small):
        assert prefill_kernel(q, k, v, cfg) == "flex"
        flexwalk.reset_counters()
        out, _ = sketchwalk_attention(q, k, v, cfg, 0)
    assert "triton_prefill" not in flexwalk.counters() and flexwalk.counters()["sparse_prefill"] == 1
    _, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0)
    assert_matches_reference(q, k, v, token_mask(64, selection=sel), out)
    z = torch.zeros(1, 1, dtype=torch.int32)
    zi = torch.zeros(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="shared memory"):
        TP.sparse_prefill_attention(q, k, v, z, zi, z, zi, z[0], z[0] + 64, q_block=16, kv_block=16, smem=small)


@pytest.mark.parametrize("d,block,q_block", [(128, 128, 128), (256, 64, 128)])
@pytest.mark.parametrize("density", [1.0, 0.4])
def test_float32_tiles_compute_the_attention(d, block, q_block, density):
    """float32 through the Triton kernel (the interpreter) with the tiles chosen for it: at
    head dim 128 with 128-token blocks (the H200's failing case: now 128 x 64 tiles)
    and at head dim 256 with a 128-row query block over 64-token key blocks (64-row programs,
    two per query block), GQA 4:1, left padding, against the eager oracle; at full budget
    also against plain causal attention."""
    cfg = SketchWalkConfig(block_size=block, query_block_size=q_block if q_block != block else None,
                           density=density, dense_layers=0, dense_below=0)
    n = 2 * q_block + 45
    q, k, v = random_qkv(2, 4, 1, n, d, seed=d + block)
    kv = torch.ones(2, n, dtype=torch.bool)
    kv[1, :37] = False
    with flexwalk.options(prefill_kernel="triton"), flexwalk.stats.launch_log() as launches:
        out, _ = sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
    _, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
    assert flexwalk.counters()["triton_prefill"] == 1
    assert_matches_reference(q, k, v, token_mask(n, selection=sel, key_valid=kv), out)
    if density == 1.0:
        assert_matches_reference(q, k, v, token_mask(n, key_valid=kv), out)
    (launch,) = launches
    bm, bn, warps, stages = TP.launch_config(torch.float32, d, q_block, block)
    assert (launch["BLOCK_M"], launch["BLOCK_N"], launch["num_warps"], launch["num_stages"]) == (bm, bn, warps, stages)
    assert launch["M_SPLIT"] == q_block // bm and launch["PRECISION"] == "ieee"
    assert TP.shared_memory(torch.float32, d, bm, bn, stages) <= BUDGET
    if (d, block) == (128, 128):
        assert (bm, bn, stages) == (128, 64, 3)


@pytest.mark.parametrize("block_g", [16, 32, 64, 128])
@pytest.mark.parametrize("elem", [4, 2])
def test_decode_tiles_fit_hopper(elem, block_g):
    """The decode split kernel's tiles (keys per tile, stages) for every head dim, block size
    and query-row tile (GQA groups up to 128): within the Hopper limit less 8 KiB, the sub-tile
    a power of two dividing the block.  For the usual groups (BLOCK_G 16, 32) at float32 and
    head dim 256 that is the pipeline of before; 128 rows of float32 take fewer stages."""
    cpu = torch.device("cpu")
    for d in HEAD_DIMS:
        for block in (16, 32, 64, 128, 256):
            sub, stages = TD.tiling(block, d, elem, cpu, block_g=block_g)
            assert block % sub == 0 and sub >= 16 and stages >= 1
            assert TD.shared_memory(elem, d, block_g, sub, stages) <= HOPPER_SMEM - 8 * 1024, (d, block, sub, stages)
    assert TD.tiling(128, 256, 4, cpu, block_g=32) == (32, 3)
    assert TD.tiling(128, 256, 4, cpu, block_g=128) == (32, 2)


@pytest.mark.parametrize("key", sorted(COMPILED_SM90_DECODE), ids=lambda k: "-".join(map(str, k)))
def test_the_decode_formula_against_triton_sm90(key):
    name, d, block_g, sub, stages = key
    elem = 4 if name == "fp32" else 2
    compiled = COMPILED_SM90_DECODE[key]
    need = TD.shared_memory(elem, d, block_g, sub, stages)
    assert need <= compiled <= need + block_g * 4


_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flexwalk.kernels import triton_prefill as TP
from flexwalk.kernels.triton_runtime import HOPPER_SMEM
from flexwalk.prefill import prefill_kernel

class Allocated(Exception):
    pass

def hook(backend, stages, options, language, capability):
    def stop(src, metadata):
        raise Allocated(metadata["shared"])
    stages["ptx"] = stop
    stages.pop("cubin", None)

triton.knobs.runtime.add_stages_inspection_hook = hook
fn = TP._jit
out = {}
for name, d, bm, bn, stages, residual in json.loads(sys.argv[1]):
    cx = dict(D=d, BLOCK_M=bm, BLOCK_N=bn, KV_BLOCK=max(bn, 64), M_SPLIT=1, REVERSE=True,
              PRECISION="ieee" if name == "fp32" else "tf32", RESIDUAL=residual)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in cx: sig[a] = "constexpr"
        elif a in ("Q", "K", "V", "O", "KM", "VM"): sig[a] = "*" + name
        elif a in ("F_NUM", "F_IDX", "P_NUM", "P_IDX", "START", "END"): sig[a] = "*i32"
        elif a == "LC": sig[a] = "*fp32"
        elif a == "TBL": sig[a] = "*u8"
        elif a == "qk_scale": sig[a] = "fp32"
        else: sig[a] = "i32"
        # as a launch specialises them: pointers and the strides of real shapes divisible by 16
        # (without it the tiles feeding wgmma are not pipelined, and 16-bit needs look smaller)
        if sig[a].startswith("*") or (a.startswith("s") and a not in ("sfnm", "spnm")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()},
                    attrs=attrs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": stages})
        shared = kernel.metadata.shared
    except Allocated as e:
        shared = e.args[0]
    out[json.dumps([name, d, bm, bn, stages, residual])] = shared
print(json.dumps(out))
"""


@pytest.mark.skipif(os.environ.get("FLEXWALK_COMPILE_SM90") != "1",
                    reason="compiles the kernel for sm_90 (minutes on a CPU): set FLEXWALK_COMPILE_SM90=1")
def test_the_compiler_agrees(tmp_path):
    """Compiles the prefill kernel for sm_90 with the installed Triton (no GPU needed: it stops
    after shared memory is allocated) at the launches chosen for float32 and bfloat16 at head
    dims 64-256 and at the one the H200 refused, and checks the formula against what it
    allocates, as test_the_formula_against_triton_sm90 does against the recorded numbers."""
    keys = {("fp32", 128, 128, 128, 3, False)}
    for dtype in (torch.float32, torch.bfloat16):
        for d in HEAD_DIMS:
            bm, bn, _, stages = TP.launch_config(dtype, d, 128, 128)
            keys.add((_NAMES[dtype], d, bm, bn, stages, False))
    bm, bn, _, stages = TP.launch_config(torch.float32, 128, 128, 128)
    keys.add(("fp32", 128, bm, bn, stages, True))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(sorted(keys))], env=env, cwd=root,
                         capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = {tuple(json.loads(k)): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    assert got[("fp32", 128, 128, 128, 3, False)] == 393216
    for (name, d, bm, bn, stages, residual), compiled in got.items():
        need = TP.shared_memory(_DTYPES[name], d, bm, bn, stages)
        assert need <= compiled <= need + TP.SMEM_MARGIN, (name, d, bm, bn, stages, residual, compiled, need)
