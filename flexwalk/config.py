"""SketchWalkConfig: every knob of the method, validated and frozen.

The config is pure data: it holds no tensors and knows nothing of models, so it can be
stored on a transformers config, hashed, compared and printed.  The budget rule it describes
lives with the top-k (flexwalk.selection.topk), which also predicts a layer's density from it
(`expected_density`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

WalkMode = Literal["walk", "damped", "one_hop", "oracle"]
HeadScoring = Literal["mean", "per_head"]
DecodeScoring = Literal["sketch", "bound"]
PrefillScoring = Literal["sketch", "bound"]

_WALK_MODES = ("walk", "damped", "one_hop", "oracle")
DEFAULT_DENSITY = 0.2
DEFAULT_DENSE_LAYERS = 2  # the paper's; dense_layers="auto" outside a model
_HEAD_SCORINGS = ("mean", "per_head")
_DECODE_SCORINGS = ("sketch", "bound")
_PREFILL_SCORINGS = ("sketch", "bound")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SketchWalkConfig.{name}={value!r} is invalid: {allowed}")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, f"must be an int >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    if value < lo or (hi is not None and value > hi):
        _fail(name, value, f"must be an int >= {lo}" + (f" and <= {hi}" if hi is not None else ""))


@dataclass(frozen=True)
class SketchWalkConfig:
    """Configuration of SketchWalk block-sparse attention.

    Budget: set at most one of ``density`` (fraction of each query block's causal key blocks,
    forced blocks included) or ``top_k_blocks`` (key blocks kept per query block, forced blocks
    included).  Sink, local and dense-tail blocks are always kept, even past the budget.
    """

    block_size: int = 64
    """Tokens per key block, and per query block of the walk (power of two, 16..256)."""
    query_block_size: int | None = None
    """Query rows per kernel block in prefill; None = block_size.  A multiple of block_size (power
    of two, <= 256): the walk runs at block_size granularity, each kernel query block pools the
    walk rows of its block_size sub-blocks and keeps the top key blocks of block_size tokens
    (128 with block_size 64: the kernel runs 128-row tiles, keys are chosen per 64 tokens)."""
    sketch_dim: int | None = None
    """SRHT sketch width r; clipped to the head dim rounded up to a power of two.  None (the
    default): the head dim itself, an exact sketch (P = [I 0]: the block means themselves, so
    block-mean scores without sketch error).  On Gemma 3 (head dim 256) that was +0.88 points (SE 0.47)
    over r = 64 across 2K-32K, and +2.19 at 32K; at head dim 128 on the H100 it cost nothing
    measurable (docs/design-notes.md).  The paper uses 64; the authors' code 128."""
    sparsity_exponent: float = 8.0
    """Inverse temperature s of the transition W = softmax(s * A).  With the default one-hop
    rule, head-mean scoring and query blocks of block_size it does not change which blocks are
    kept (the softmax is monotone along a row); it weighs the walk's products, the per-head mean
    of transitions and pooled query blocks."""
    density: float | None = None
    """Fraction of each row's causal blocks to keep, in (0, 1]; 0.2 when neither budget is set."""
    top_k_blocks: int | None = None
    """Key blocks kept per query block (forced blocks included); None when density is set."""
    sink_blocks: int = 1
    """First real blocks of each row always kept (attention sinks)."""
    local_blocks: int = 2
    """Diagonal block plus local_blocks - 1 blocks before it, always kept, within the budget.
    2 (the default): the 64 tokens before a query block's own carry the text a question or a
    needle continues.  On Qwen2.5-Coder-1.5B that scored +3.31 (SE 1.18) and +1.69 (1.12) over 1
    at 4K and 8K, level at 16K and 32K, +1.18 (SE 0.56) pooled over 4K-32K, for 0.004 of density
    at 4K and none from 16K (docs/accuracy.md)."""
    dense_tail_blocks: int = 2
    """The last T query blocks attend every causal block (cost T / num_blocks of dense).  2 (the
    default): the 128 tokens that end a prompt hold its question and the answer's prefix, which
    one 64-token block does not cover (a key-value question in a chat template is about 90
    tokens).  On Qwen2.5-Coder-1.5B with two local blocks that scored +0.62 (SE 0.52), +1.25
    (0.67) and +1.25 (0.56) over 1 at 4K, 8K and 16K, +1.04 (SE 0.34) pooled, 19 answers better
    and 5 worse, for 0.025 of density at 4K, 0.013 at 8K and 0.006 at 16K (docs/accuracy.md)."""
    dense_layers: int | Literal["auto"] = "auto"
    """Layers with layer_idx < dense_layers run dense attention.  "auto" (the default): 2, the
    paper's, raised in a model that mixes sliding-window and full-attention layers so that its
    first full-attention layer is dense too (Gemma 3: 6, its first full layer being index 5;
    Gemma 2's, index 1, already is).  On Gemma 3 270M that was level with dense at every length
    from 2K to 32K, worst task -2, for at most 4% of prefill from 4K (docs/design-notes.md).  Decided
    per model like residual (`for_model`); 2 outside a model."""
    walk: WalkMode = "one_hop"
    """'walk': R_l = R_{l-1} W_l; 'damped': (1-beta) W_l + beta R_{l-1} W_l; 'one_hop' (the
    default): R_l = W_l; 'oracle': each layer ranks key blocks by their exact attention mass (an
    evaluation upper bound: O(n^2) work per layer, prefill only).  The walk across layers
    ('damped') was level with one-hop on every model measured, so the simpler rule is the
    default: on Qwen2.5-Coder-1.5B (26 sparse layers) the damped walk scored -0.78 (SE 0.47)
    against one-hop over 1600 RULER NIAH samples at 4K-32K, on SmolLM2-135M +0.81, -0.12 and
    -0.75 at 2K-8K, on Gemma 3 270M the same on all 2000 (docs/accuracy.md)."""
    damping: float = 0.25
    """beta of the damped walk, in [0, 1]."""
    walk_steps: int = 1
    """Times the walk step is applied per sparse layer ('walk' and 'damped'): starting from
    R_{l-1}, R <- (1 - beta) W_l + beta normalise(R W_l) (beta = 1 for 'walk') walk_steps times,
    so the layer's own multi-hop paths W_l^2, W_l^3, ... enter with weights beta, beta^2, ...
    and R_{l-1} with beta^walk_steps.  The authors' code uses 3; 1 is the paper's rule.  The
    first sparse layer of a forward (no R_{l-1}) uses W_l whatever the value; one_hop and
    oracle ignore it.  From 1 to 8."""
    head_scoring: HeadScoring = "mean"
    """'mean': score head-mean q/k; 'per_head': score each head, average the transitions."""
    prefill_scoring: PrefillScoring = "bound"
    """Prefill: the block scores A of W_l = softmax(s * scale * A).  'bound' (the default): each
    query block's mean against each key block's channel-wise maximum and minimum key,
    sum_d max(q_d * kmax_d, q_d * kmin_d) (an upper bound on q_mean . k for every key k of the
    block; decode_scoring's rule, with the heads reduced as under head_scoring).  A needle of a
    few tokens is averaged away in its block's mean key but stands out in the block's extremes.
    'sketch': the sketched block means' products, q_mean . k_mean (the paper's rule).  On
    Qwen2.5-Coder-1.5B 'bound' scored +2.81 (SE 0.53) over 'sketch' across 1600 RULER NIAH
    samples at 4K-32K (density 0.2, one-hop), on SmolLM2-135M +0.38 (SE 0.43) across 1200
    (docs/accuracy.md).  It reads k once more per layer (the head-mean keys' block extremes);
    under tensor parallelism it all-reduces the head-mean keys; sketch_dim does not apply to it."""
    seed: int = 0
    """Seed of the SRHT sketches (selection is deterministic under it)."""
    dense_below: int | Literal["auto"] = "auto"
    """Prefill lengths (tokens) below this run dense attention (and sparse decode starts at this
    length).  "auto": AUTO_DENSE_BELOW of the device the attention runs on: 8192 on CUDA, where
    sparse prefill is measured no faster than cuDNN SDPA below 8K (docs/benchmarks.md), 2048
    elsewhere."""
    skip_decode: bool = True
    """True: decode steps run dense attention (prefill-only sparsity); False: sparse decode too."""
    skip_prefill: bool = False
    """True: prefill runs dense attention (with skip_decode=False: decode-only sparsity)."""
    decode_scoring: DecodeScoring = "bound"
    """Sparse decode: how a step scores the key blocks for its token.  'bound' (the default):
    each query head against each block's channel-wise maximum and minimum key of its KV head,
    sum_d max(q_d * kmax_d, q_d * kmin_d), an upper bound on every logit in the block (Quest's
    estimate); the token's row is the mean over heads of softmax(scale * bound), then walked
    as under 'sketch'.  'sketch': the prefill's rule on one row, the token's query (head mean, or per head
    under head_scoring) against the sketched block-mean keys, softmax(s * scale * a).  A needle
    of a few tokens is averaged away in a block mean but stands out in a block's extremes: on
    SmolLM2 niah_single_1 at 8K (H100, 50 samples, density 0.22) sparse decode scored 88%
    with 'bound' and 74% with 'sketch', against 86% for dense decode after the same prefill
    (docs/decode.md).  'bound' keeps 2 x D values per block and KV head in the keys' dtype
    (2 / block_size of the K cache) and cost 20-36 us more per layer and step at batch 1 on
    the H100 (none at batch 8)."""
    decode_pinned: float = 0.1
    """Sparse decode: fraction of the prompt's blocks kept in every decode step, forced like sink
    and local blocks (so counted within the budget): the blocks the prompt's last block_size
    queries attend most (exact attention mass, head mean, computed once per prefill).  0: none."""
    decode_dense_steps: int = 4
    """Sparse decode: the first N decode steps after a prefill attend every causal block (a
    larger budget for the first answer tokens, where a retrieval answer is decided), counted
    `dense_decode_first` per layer and step; later steps select.  4 by default: on
    Qwen2.5-Coder-1.5B at 8K-32K they halve sparse decode's loss against dense decode
    (docs/decode.md).  0: every step selects."""
    residual: bool | Literal["auto"] = "auto"
    """Prefill: every query also attends one summary entry per whole key block before its query
    block that the selection dropped (the block's mean key and mean value, weighted by its number
    of keys), so the dropped blocks keep an estimate of their share of the softmax instead of
    none (flexwalk.kernels.residual; decode steps do not use it).  "auto" (the default): on in models
    that mix sliding-window and full-attention layers (Gemma 2 and 3, ...: the few full layers
    are the model's only long-range path), off elsewhere, and off when `sketchwalk_attention`
    is called outside a model.  On Gemma 3 270M it took SketchWalk from up to 4.6 points below
    dense to within 1.75 at every length from 2K to 32K; on SmolLM2-135M (every layer full
    attention) it cost 3.1 and 1.6 points at 2K and 4K (docs/design-notes.md)."""

    @property
    def dense_layer_count(self) -> int:
        """Layers (by index) that run dense: dense_layers, or 2 for an undecided "auto"."""
        return DEFAULT_DENSE_LAYERS if self.dense_layers == "auto" else self.dense_layers

    @property
    def uses_residual(self) -> bool:
        """Whether the residual runs: residual=True (a model's "auto" is decided by `for_model`)."""
        return self.residual is True

    def for_model(self, hybrid: bool, first_full_layer: int | None = None) -> "SketchWalkConfig":
        """This config with the "auto" settings decided for a model.  residual: on when `hybrid`
        (the model mixes sliding-window and full-attention layers), else off.  dense_layers: 2,
        or first_full_layer + 1 when `hybrid` and that is more (the index of the model's first
        full-attention layer; None: not known).  Other settings come back as they are."""
        changes: dict[str, Any] = {}
        if self.residual == "auto":
            changes["residual"] = bool(hybrid)
        if self.dense_layers == "auto":
            n = DEFAULT_DENSE_LAYERS
            if hybrid and first_full_layer is not None:
                n = max(n, first_full_layer + 1)
            changes["dense_layers"] = n
        return self.replace(**changes) if changes else self

    def __post_init__(self) -> None:
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs > 256 or bs & (bs - 1):
            _fail("block_size", bs, "must be a power of two between 16 and 256")
        qbs = self.query_block_size
        if qbs is not None and (isinstance(qbs, bool) or not isinstance(qbs, int) or qbs < bs or qbs > 256
                                or qbs & (qbs - 1)):
            _fail("query_block_size", qbs,
                  f"must be None or a power of two from block_size={bs} to 256 (a multiple of block_size)")
        r = self.sketch_dim
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 4096):
            _fail("sketch_dim", r, "must be None (the head dim: an exact sketch) or an int from 1 to 4096")
        s = self.sparsity_exponent
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            _fail("sparsity_exponent", s, "must be a finite number > 0")
        if self.density is None and self.top_k_blocks is None:
            object.__setattr__(self, "density", DEFAULT_DENSITY)
        if (self.density is None) == (self.top_k_blocks is None):
            raise ValueError(
                f"SketchWalkConfig: set exactly one of density={self.density!r} and "
                f"top_k_blocks={self.top_k_blocks!r} (the other must be None)"
            )
        if self.density is not None:
            d = self.density
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < d <= 1.0):
                _fail("density", d, "must be a number in (0, 1]")
        if self.top_k_blocks is not None:
            _check_int("top_k_blocks", self.top_k_blocks, 1)
        _check_int("sink_blocks", self.sink_blocks, 0)
        _check_int("local_blocks", self.local_blocks, 1)
        _check_int("dense_tail_blocks", self.dense_tail_blocks, 0)
        if self.dense_layers != "auto":
            v = self.dense_layers
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _fail("dense_layers", v, "must be an int >= 0 or 'auto' (2, and a hybrid model's first full layer)")
        if self.walk not in _WALK_MODES:
            _fail("walk", self.walk, f"must be one of {_WALK_MODES}")
        b = self.damping
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (0.0 <= b <= 1.0):
            _fail("damping", b, "must be a number in [0, 1]")
        _check_int("walk_steps", self.walk_steps, 1, 8)
        if self.head_scoring not in _HEAD_SCORINGS:
            _fail("head_scoring", self.head_scoring, f"must be one of {_HEAD_SCORINGS}")
        if self.prefill_scoring not in _PREFILL_SCORINGS:
            _fail("prefill_scoring", self.prefill_scoring, f"must be one of {_PREFILL_SCORINGS}")
        if self.decode_scoring not in _DECODE_SCORINGS:
            _fail("decode_scoring", self.decode_scoring, f"must be one of {_DECODE_SCORINGS}")
        _check_int("seed", self.seed, 0)
        if self.dense_below != "auto":
            v = self.dense_below
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _fail("dense_below", v, "must be an int >= 0 or 'auto'")
        pf = self.decode_pinned
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not (0.0 <= pf <= 1.0):
            _fail("decode_pinned", pf, "must be a number in [0, 1]")
        _check_int("decode_dense_steps", self.decode_dense_steps, 0)
        if not isinstance(self.residual, bool) and self.residual != "auto":
            _fail("residual", self.residual, "must be a bool or 'auto' (on in models with sliding-window layers)")
        if not isinstance(self.skip_decode, bool):
            _fail("skip_decode", self.skip_decode, "must be a bool")
        if not isinstance(self.skip_prefill, bool):
            _fail("skip_prefill", self.skip_prefill, "must be a bool")
        if self.walk == "oracle" and not self.skip_decode:
            _fail("walk", self.walk, "'oracle' is a prefill-only evaluation bound: it needs skip_decode=True")
        if self.walk in ("walk", "damped") and not self.skip_decode and self.prefill_scoring == "bound":
            _fail("walk", self.walk, "with sparse decode (skip_decode=False) the walk across layers needs "
                  "prefill_scoring='sketch' (the decode state carries W_l under the mean-key rule); "
                  "or use walk='one_hop' (the default)")
        if self.skip_prefill and self.skip_decode:
            raise ValueError(
                "SketchWalkConfig: skip_prefill=True and skip_decode=True leave nothing sparse; "
                "set skip_decode=False for decode-only sparsity, or use attn_implementation='sdpa'"
            )

    # ----------------------------------------------------------------- helpers

    @property
    def q_block(self) -> int:
        """Query rows per kernel block in prefill: query_block_size, or block_size."""
        return self.block_size if self.query_block_size is None else self.query_block_size

    def min_sparse_length(self, device: Any = "cpu") -> int:
        """The dense_below that applies on `device` (a torch.device, its type or name)."""
        if self.dense_below != "auto":
            return self.dense_below
        kind = getattr(device, "type", None) or str(device).split(":")[0]
        return AUTO_DENSE_BELOW.get(kind, AUTO_DENSE_BELOW["default"])
    def replace(self, **changes: Any) -> "SketchWalkConfig":
        """A copy with some fields changed (validated again).

        Setting ``top_k_blocks`` clears ``density`` and the other way round, so
        ``cfg.replace(top_k_blocks=8)`` does what it says.
        """
        if changes.get("top_k_blocks") is not None and "density" not in changes:
            changes["density"] = None
        if changes.get("density") is not None and "top_k_blocks" not in changes:
            changes["top_k_blocks"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SketchWalkConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"SketchWalkConfig: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SketchWalkConfig":
        """One of the named presets (see PRESETS), optionally with fields changed."""
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is unknown: allowed {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# dense_below="auto" per device type.  CUDA: one layer at 20% density with the default 64-token
# blocks (Triton kernel, selection included) is 0.92x of cuDNN SDPA at 4K and 1.17x at 8K on an
# H100 (docs/benchmarks.md, short prompts), and at 4K the default budget costs Qwen2.5-Coder-1.5B
# 4.0 NIAH points (docs/accuracy.md); elsewhere (the CPU) sparse prefill pays from about 2K on.
AUTO_DENSE_BELOW: dict[str, int] = {"cuda": 8192, "default": 2048}

PRESETS: dict[str, SketchWalkConfig] = {
    # The paper's granularity and 20% density; one-hop selection; exact sketch.
    "default": SketchWalkConfig(),
    # More budget, per-head scoring and the residual summaries: closest to dense.
    "quality": SketchWalkConfig(density=0.3, head_scoring="per_head", residual=True),
    # Kernel-friendly 128-token blocks, 10% density, the diagonal as the only local block (a
    # second would take most of a short row's 10%), one dense tail block (128 tokens, as the
    # default's two of 64).
    "speed": SketchWalkConfig(block_size=128, density=0.1, local_blocks=1, dense_tail_blocks=1),
    # Long prompts: 128-token blocks, 15% density, dense only under 8K, one dense tail block
    # (128 tokens, as the default's two of 64).
    "long-context": SketchWalkConfig(block_size=128, density=0.15, dense_below=8192, dense_tail_blocks=1),
}
