"""What the benchmarks measure: the attention shapes, the inputs built for them, and the check a
sparse layer passes before it is timed.  Shared by the pytest-benchmark suite (conftest.py) and
the GPU report (report.py).

Shapes: on CUDA the Llama-3.1-8B attention layer (32 query / 8 KV heads, head dim 128, bf16);
on the CPU a small one (8 / 2 heads, head dim 64, float32) that runs in seconds.  A layer is
measured as a user calls it: `flexwalk.sketchwalk_attention` on layer 0 with every layer sparse
(dense_layers=0, dense_below=0), so the selection and the attention are both inside the time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexwalk
from flexwalk import SketchWalkConfig, sketchwalk_attention
from flexwalk.kernels import fa4
from flexwalk.reference import rows_error_budget, sample_rows, token_mask
from flexwalk.selection.driver import fused_block_selection


@dataclass(frozen=True)
class Shape:
    """One attention layer's heads and dtype (GQA: q_heads a multiple of kv_heads)."""

    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def to_dict(self) -> dict:
        return {**asdict(self), "dtype": str(self.dtype).removeprefix("torch.")}


LLAMA_8B = Shape("Llama-3.1-8B attention", 32, 8, 128, torch.bfloat16)
SMALL = Shape("small CPU attention", 8, 2, 64, torch.float32)

PREFILL_KERNELS = ("auto", "triton", "flex", "fa4")  # flexwalk.Options.prefill_kernel


def shape_for(device: str | torch.device) -> Shape:
    return LLAMA_8B if torch.device(device).type == "cuda" else SMALL


def kernels_for(device: str | torch.device) -> list[str]:
    """The prefill kernels worth timing here: on CUDA "auto", the Triton kernel, flex and
    FlashAttention 4 where it is installed; on the CPU "auto" (flex) and flex (the Triton kernel
    runs there only through triton's interpreter, whose time says nothing)."""
    if torch.device(device).type != "cuda":
        return ["auto", "flex"]
    return ["auto", "triton", "flex"] + (["fa4"] if fa4.available() else [])


def qkv(shape: Shape, n: int, *, batch: int = 1, device: str | torch.device = "cpu", seed: int | None = None):
    """Random q [B, Hq, n, D] and k, v [B, Hkv, n, D] of `shape`, the same for the same seed (n)."""
    g = torch.Generator(device=device).manual_seed(n if seed is None else seed)
    return tuple(torch.randn(batch, h, n, shape.head_dim, device=device, generator=g).to(shape.dtype)
                 for h in (shape.q_heads, shape.kv_heads, shape.kv_heads))


def layer_config(block_size: int, density: float, prefill_scoring: str | None = None) -> SketchWalkConfig:
    """One sparse layer whatever its index and length (the walk starts at layer 0); the default
    prefill scoring unless one is given."""
    scoring = {} if prefill_scoring is None else {"prefill_scoring": prefill_scoring}
    return SketchWalkConfig(block_size=block_size, density=density, dense_layers=0, dense_below=0, **scoring)


def dense_attention(q, k, v):
    """The dense baseline: causal SDPA, through cuDNN on CUDA (the fastest dense kernel on Hopper)."""
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def dense_backend(device: str | torch.device) -> str:
    return "cuDNN SDPA" if torch.device(device).type == "cuda" else "SDPA"


def synchronized(fn, device: str | torch.device):
    """fn, then a wait for the device (what a wall-clock timer of a CUDA call needs)."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def kernel_ran(counters: dict | None = None) -> str:
    """Which prefill kernel ran, by the counters given (default: those since the last
    `flexwalk.reset_counters()`)."""
    c = flexwalk.counters() if counters is None else counters
    return "fa4" if c.get("fa4_prefill") else "triton" if c.get("triton_prefill") else "flex"


def dense_varlen(q, k, v, cu_seqlens, max_seqlen: int):
    """Dense causal varlen attention through torch's FlashAttention varlen kernel
    (torch.nn.attention.varlen), as a function of no arguments; None where it does not run here
    (the CPU, a torch without it)."""
    if not q.is_cuda:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    causal = ({"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters
              else {"window_size": (-1, 0)})
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    if not gqa and q.shape[1] != k.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))

    def run():
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **causal, **gqa)

    try:
        run()
    except Exception:
        return None
    return run


def check_layer(q, k, v, config: SketchWalkConfig) -> dict:
    """Run one sparse layer under the options in force and compare it with the eager oracle:
    the layer's own selection as a token mask through SDPA (`flexwalk.reference`), in float64 and
    in the inputs' dtype, on `sample_rows` of each batch row; and the same kernel at full budget
    (density 1) against dense causal attention.  Returns {kernel, density, err, budget, full_err,
    full_budget, rows, finite, ok}, the errors of the batch row and rows furthest from their budget."""
    n = q.shape[2]
    rows = sample_rows(n, device=q.device)
    flexwalk.reset_counters()
    out, _ = sketchwalk_attention(q, k, v, config, 0)
    ran = kernel_ran()
    density = flexwalk.density_report()[0]
    sel, _ = fused_block_selection(q, k, config, 0, None)  # the blocks the layer attended
    full, _ = sketchwalk_attention(q, k, v, config.replace(density=1.0), 0)
    worst = [(0.0, 1.0), (0.0, 1.0)]
    for b in range(q.shape[0]):  # one batch row at a time: the float64 reference repeats k and v per query head
        one = slice(b, b + 1)
        sel_b = dataclasses.replace(sel, mask=sel.mask[one], kept=sel.kept[one], causal=sel.causal[one])
        checks = (rows_error_budget(q[one], k[one], v[one], out[one],
                                    lambda r: token_mask(n, selection=sel_b, rows=r), rows),
                  rows_error_budget(q[one], k[one], v[one], full[one],
                                    lambda r: token_mask(n, rows=r, device=q.device), rows))
        worst = [max(w, c, key=lambda e: e[0] / e[1]) for w, c in zip(worst, checks)]
    (err, budget), (full_err, full_budget) = worst
    finite = bool(torch.isfinite(out).all() and torch.isfinite(full).all())
    ok = finite and err <= budget and full_err <= full_budget
    return dict(kernel=ran, density=density, err=err, budget=budget, full_err=full_err, full_budget=full_budget,
                rows=len(rows), finite=finite, ok=ok)


def median_ms(fn, device: str | torch.device, *, long: bool = False) -> float:
    """Median milliseconds of fn after a warm-up: triton.testing.do_bench on CUDA (CUDA events,
    the L2 cache flushed between calls; `long` calls of 50 ms or more get 600 ms of repetitions
    so that several are taken), a wall clock on the CPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5 if long else 25, rep=600 if long else 100,
                                       return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- model-shaped inputs


def model_config(device: str | torch.device, layers: int):
    """A transformers LlamaConfig with `layers` layers: on CUDA Llama-3.1-8B's shape (hidden 4096,
    MLP 14336, 32 / 8 heads of 128, vocabulary 128256, RoPE theta 500000), on the CPU a small
    model of the SMALL attention shape."""
    from transformers import LlamaConfig

    if torch.device(device).type == "cuda":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                           max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=False)
    return LlamaConfig(hidden_size=SMALL.q_heads * SMALL.head_dim, intermediate_size=1024, num_hidden_layers=layers,
                       num_attention_heads=SMALL.q_heads, num_key_value_heads=SMALL.kv_heads, vocab_size=512,
                       max_position_embeddings=8192, tie_word_embeddings=False)


def build_model(device: str | torch.device, layers: int):
    """A random-weight causal LM of `model_config` (bf16 on CUDA, float32 on the CPU), sdpa, eval."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(device, layers), dtype=shape_for(device).dtype,
                                                attn_implementation="sdpa").eval()


def prompt(n: int, vocab: int, device: str | torch.device) -> torch.Tensor:
    """[1, n] random token ids, the same for the same n."""
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, min(vocab, 128000), (1, n), generator=g).to(device)


def peak_gib(device: str | torch.device) -> float:
    """Peak allocated GiB since the last reset (NaN on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else math.nan
