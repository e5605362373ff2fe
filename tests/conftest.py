"""Shared test helpers: the reference check and random inputs.

Tolerances follow FlashAttention's tests (flexwalk.reference.error_budget): compute the reference
once in the test dtype and once in float64; the implementation under test may be at most 2x as
far from the float64 result as the same-dtype reference is, plus a few ulps of the output's
magnitude.
"""

from __future__ import annotations

import os
import pathlib

# Compiled flex kernels are cached on disk between runs (first compile ~5-10 s on a CPU).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "inductor"))

# Without a GPU, Triton kernels (flexwalk.kernels.triton_decode) run in triton's interpreter on CPU
# tensors; it is chosen when triton is imported, so before torch.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import flexwalk  # noqa: E402
from flexwalk.reference import reference_error_budget  # noqa: E402
from flexwalk.selection.topk import kept_blocks  # noqa: E402



def _patch_triton_interpreter() -> None:
    """Two fixes to triton's interpreter (what runs flexwalk's Triton kernels on CPU here).

    NumPy >= 2.3: the interpreter turns a loaded scalar (a size-1 array) into a loop bound with
    int(), which NumPy refuses for arrays of ndim 1; .item() is what it means.

    Speed: it re-patches triton.language (inspect.getmembers over its modules) on every call of a
    @triton.jit helper from inside a kernel: about 40% of the time of flexwalk's interpreted
    kernels.  Patching once per helper is enough.  A kernel launch patches the `tl` of its own
    module (our helpers share it) for the whole launch, again at every launch; a helper's own patch
    is never undone (the interpreter keeps no handle on it), which is what keeps triton's standard
    helpers (tl.sum, tl.max, ...: they see `triton.language.core`) patched after their first call.
    A builtin left unpatched would fail loudly ("_semantic argument must be provided"), not
    compute something else."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    original = interp._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interp._patch_lang_tensor = patch
    patched: set = set()

    def device_call(self, *args, **kwargs):
        if self.fn not in patched:
            interp._patch_lang(self.fn)
            patched.add(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    interp.InterpretedFunction.__call__ = device_call


_patch_triton_interpreter()


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (`make test` runs one worker per core), each worker takes its share of
    the cores for torch's intra-op threads instead of all of them: without this, two workers on
    two cores run four OpenMP threads that spin against each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))


_share_the_cores_between_workers()

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def assert_matches_reference(q, k, v, mask, out, **kw):
    err, allowed = reference_error_budget(q, k, v, mask, out, **kw)
    assert err <= allowed, f"max error {err:.3e} exceeds budget {allowed:.3e} (2x the same-dtype reference's error)"


def block_budget(config, n_causal: int, forced: int) -> int:
    """Blocks a row with n_causal causal blocks, `forced` of them forced, keeps under the
    config's budget (the selection's own rule, selection.topk.kept_blocks, on ints)."""
    return int(kept_blocks(torch.tensor(n_causal), torch.tensor(forced), top_k=config.top_k_blocks,
                           density=config.density))


FP32_FLOOR = 2e-5  # absolute floor on logits of magnitude ~1 (two fp32 computations of one function)


def floor_tol(ref: torch.Tensor) -> float:
    """fp32 floor for two fp32 computations of the same function (logits of magnitude ~1)."""
    return FP32_FLOOR * max(1.0, ref.abs().max().item())


@pytest.fixture(autouse=True)
def _fresh_counters():
    flexwalk.reset_counters()
    yield


def random_qkv(batch, hq, hkv, n, d, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, d, generator=g).to(dtype)
    k = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def graph_inputs(q, k, kv, n_pad):
    """What the CUDA graph of the selection holds (selection.driver._SelectionGraph): head means [B, 1,
    n_pad, D] zero past n, validity [B, n_pad] False past n."""
    bsz, _, n, d = q.shape
    qm = torch.zeros(bsz, 1, n_pad, d)
    km = torch.zeros(bsz, 1, n_pad, d)
    qm[:, :, :n] = q.float().mean(1, keepdim=True)
    km[:, :, :n] = k.float().mean(1, keepdim=True)
    valid = torch.zeros(bsz, n_pad, dtype=torch.bool)
    valid[:, :n] = kv
    return qm, km, valid


def left_padding(batch, n, pads):
    """[B, n] bool key validity with pads[b] leading padding tokens."""
    kv = torch.ones(batch, n, dtype=torch.bool)
    for b, p in enumerate(pads):
        kv[b, :p] = False
    return kv


@pytest.fixture(params=["flex", "triton"])
def decode_kernel(request):
    """Run a decode test through both attention kernels: compiled flex with a one-row BlockMask,
    and the split-KV Triton kernel (through triton's interpreter on CPU)."""
    with flexwalk.options(decode_kernel=request.param):
        yield request.param


def pytest_terminal_summary(terminalreporter):
    """Which transformers the run tested (CI runs the tests on the newest and on the oldest supported)."""
    try:
        import transformers
    except ImportError:
        terminalreporter.write_line("transformers: not installed")
        return
    terminalreporter.write_line(f"transformers {transformers.__version__}")
