"""The decode state of one layer: block sums of the keys, their sketches and the transition W_l,
built from a prefill and updated by every new token.

A `DecodeState` is built from a layer's prefill (`DecodeState.from_prefill`) and then absorbs
every new token (`absorb`): running sums and counts of head-mean keys per block, the sketched
block keys, the running query sum of the current block and the layer's block transition
matrix W_l.  A step touches one block row and one block column, O(nb * r) work; no step reads
K again.

Shapes are fixed by the state's capacity (`kv_tokens`): the mask is as wide as the capacity and
the live length is a tensor, so steps never recompile.  With a static cache the capacity is the
cache itself; with a growing (dynamic) cache K/V are padded up to the capacity and the
capacity grows in length buckets (kernels.flex.bucket_length).

Every tensor here is [B, heads, nb, D], [B, nb, r] or [B, nb, nb]: no token x token tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import SketchWalkConfig
from ..distributed import group_mean
from ..kernels.flex import bucket_length, contiguous_rows, key_bounds, packed
from ..selection.sketch import (
    LayerSketch,
    block_causal_mask,
    block_key_bounds,
    effective_sketch_dim,
    head_reduce,
    layer_sketch,
    num_blocks,
    sketch_matrix,
    transition_rows,
)
from ..selection.topk import top_fraction
from .scoring import prompt_block_mass

INT = torch.int32
"""The dtype of block counts and indices in decode (what the kernels read)."""


class DecodePaddingError(NotImplementedError):
    """A prompt whose padding sparse decode cannot follow: padded on the right (decode would append
    after the padding) or with padding between real tokens (the decode masks bound each row's
    real keys by one start)."""


class DecodeState:
    """SketchWalk decode state of one layer for one batch of sequences.

    Tensors (fp32 unless noted; Hq' / Hk' are 1 for head_scoring="mean", else the model's heads):
      k_sum [B, Hk', C, D], k_count [B, C]: sums and counts of real keys per block;
      k_sketch [B, Hk', C, r]: sketched block-mean keys;
      q_sum [B, Hq', D], q_count [B]: running query sum of the block holding the last token;
      transition [B, C, C]: W_l, rows of blocks not reached yet are 0;
      k_bounds [B, Hkv, C, 2D] (the keys' dtype), decode_scoring="bound" only (else None): the
        channel-wise maxima of each block's real keys and of their negations, [max k, -min k]
        per block and KV head (-inf in blocks with no key yet): one max-reduction keeps both
        (`k_max` and `k_min` read them out);
      pinned [B, C] bool: prompt blocks every step keeps (config.decode_pinned, see `pin`);
      key_start [B] int32: first real key of each row (left padding);
      pos: 0-dim int64, tokens absorbed (on the device; `length` is its host mirror);
      last_key [B, Hkv, D] (model dtype): the last absorbed key, a fingerprint of the cache
        this state belongs to;  stale: 0-dim bool, set once a step finds the cache or the
        position disagreeing with the state (that sequence then decodes densely, exactly).
    C = ceil(kv_tokens / block_size) is the capacity in blocks.
    process_group: tensor parallelism, this rank holding an equal share of the heads: the
      state holds the group's head means (identical on every rank) and each step all-reduces
      its new query and key head means and its staleness flag, so every rank selects the same
      blocks as one process holding every head.  head_scoring="mean" only; such a state's
      steps are not captured in CUDA graphs.  decode_scoring="bound": each rank bounds its own
      KV heads' keys and each step all-reduces the token's row (the mean over every head).
    """

    def __init__(
        self,
        config: SketchWalkConfig,
        layer_idx: int,
        *,
        batch: int,
        q_heads: int,
        k_heads: int,
        head_dim: int,
        scale: float,
        kv_tokens: int,
        device: torch.device | str,
        growable: bool = True,
        process_group=None,
        kv_heads: int | None = None,
        key_dtype: torch.dtype = torch.float32,
    ):
        if process_group is not None and config.head_scoring != "mean":
            raise NotImplementedError(
                f"sparse decode under tensor parallelism with head_scoring={config.head_scoring!r}: only 'mean' "
                "(one all-reduce of the head means per step) is supported")
        if config.walk in ("walk", "damped") and config.prefill_scoring == "bound":
            raise ValueError(f"a decode state with walk={config.walk!r} needs prefill_scoring='sketch': it carries "
                             "W_l under the mean-key rule; use walk='one_hop' (the default) with 'bound'")
        self.config = config
        self.process_group = process_group
        self.layer_idx = layer_idx
        self.block_size = config.block_size
        self.scale = float(scale)
        self.head_dim = head_dim
        self.kv_tokens = int(kv_tokens)
        self.growable = growable
        self.sketch = sketch_matrix(config, layer_idx, head_dim, device)
        r = effective_sketch_dim(head_dim, config.sketch_dim)
        c = self.capacity
        f32 = dict(dtype=torch.float32, device=device)
        self.k_sum = torch.zeros(batch, k_heads, c, head_dim, **f32)
        self.k_count = torch.zeros(batch, c, **f32)
        self.k_sketch = torch.zeros(batch, k_heads, c, r, **f32)
        self.q_sum = torch.zeros(batch, q_heads, head_dim, **f32)
        self.q_count = torch.zeros(batch, **f32)
        self.transition = torch.zeros(batch, c, c, **f32)
        self.pinned = torch.zeros(batch, c, dtype=torch.bool, device=device)
        self.k_bounds = None
        if config.decode_scoring == "bound":
            shape = (batch, k_heads if kv_heads is None else kv_heads, c, 2 * head_dim)
            self.k_bounds = torch.full(shape, float("-inf"), dtype=key_dtype, device=device)
        self.key_start = torch.zeros(batch, dtype=INT, device=device)
        self.pos = torch.zeros((), dtype=torch.int64, device=device)
        self.length = 0
        self.prompt_length = 0  # the prefill's length (decode_dense_steps counts the steps after it)
        self.last_key: torch.Tensor | None = None
        self.stale = torch.zeros((), dtype=torch.bool, device=device)
        self.stale_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.prev_and_new = torch.tensor([1, 0], device=device)  # offsets from pos: last absorbed, new
        self.captured_step = None  # this layer's step captured in a CUDA graph (decode.step), replayed while it fits

    def zero_blocks(self, kv_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero full-block tensors shaped for this capacity, allocated once."""
        z = getattr(self, "_zeros", None)
        if z is None or z[1].shape[-1] != kv_idx.shape[-1]:
            bsz, c = kv_idx.shape
            z = (torch.zeros(bsz, 1, 1, dtype=INT, device=self.device),
                 torch.zeros(bsz, 1, 1, c, dtype=INT, device=self.device))
            self._zeros = z
        return z

    # ------------------------------------------------------------------ shape
    @property
    def batch(self) -> int:
        return self.k_sum.shape[0]

    @property
    def k_max(self) -> torch.Tensor | None:
        """[B, Hkv, C, D]: channel-wise maximum of each block's real keys (decode_scoring="bound")."""
        return None if self.k_bounds is None else self.k_bounds[..., : self.head_dim]

    @property
    def k_min(self) -> torch.Tensor | None:
        """[B, Hkv, C, D]: channel-wise minimum of each block's real keys (decode_scoring="bound")."""
        return None if self.k_bounds is None else -self.k_bounds[..., self.head_dim :]

    @property
    def capacity(self) -> int:
        """Capacity in blocks."""
        return num_blocks(self.kv_tokens, self.block_size)

    @property
    def device(self) -> torch.device:
        return self.k_sum.device

    def grow(self, kv_tokens: int) -> None:
        """Enlarge the capacity to `kv_tokens` (host decision, no sync; new shapes compile once)."""
        if kv_tokens <= self.kv_tokens:
            return
        self.captured_step = None
        if not self.growable:
            raise ValueError(
                f"kv_tokens={kv_tokens} is invalid: this DecodeState was built for a fixed cache of "
                f"{self.kv_tokens} tokens"
            )
        old_c = self.capacity
        self.kv_tokens = int(kv_tokens)
        c = self.capacity
        pad = c - old_c
        self.k_sum = F.pad(self.k_sum, (0, 0, 0, pad))
        self.k_count = F.pad(self.k_count, (0, pad))
        self.k_sketch = F.pad(self.k_sketch, (0, 0, 0, pad))
        self.transition = F.pad(self.transition, (0, pad, 0, pad))
        self.pinned = F.pad(self.pinned, (0, pad))
        if self.k_bounds is not None:
            self.k_bounds = F.pad(self.k_bounds, (0, 0, 0, pad), value=float("-inf"))

    # ------------------------------------------------------------------ build
    @classmethod
    def from_prefill(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        config: SketchWalkConfig,
        layer_idx: int,
        *,
        key_valid: torch.Tensor | None = None,
        scale: float | None = None,
        kv_tokens: int | None = None,
        growable: bool | None = None,
        sketch: LayerSketch | None = None,
        process_group=None,
        softcap: float | None = None,
    ) -> "DecodeState":
        """The state after a prefill of n tokens (q [B, Hq, n, D], k [B, Hkv, n, D]).

        kv_tokens: capacity in tokens (default: the length bucket above n, grown as needed).
        Pass the static cache's length with growable=False for a fixed-size cache.
        key_valid: [B, n] bool, left padding only (decode appends real tokens on the right; a
        mask with holes or right padding raises DecodePaddingError).
        sketch: this layer's `layer_sketch(...)` when the prefill already computed it (with the
        same process_group).  process_group: tensor parallelism (see the class docstring).
        softcap: the model's attention logit softcap (used for the pinned blocks' attention mass).
        """
        bsz, hq, n, d = q.shape
        scale = d**-0.5 if scale is None else float(scale)
        if kv_tokens is None:
            kv_tokens = bucket_length(n + 1)
            growable = True if growable is None else growable
        if kv_tokens < n:
            raise ValueError(f"kv_tokens={kv_tokens} is invalid: must be >= the prefill length {n}")
        if key_valid is not None and not bool((key_valid[:, -1] & contiguous_rows(key_valid)).all()):
            raise DecodePaddingError(
                "sparse decode after right padding or padding between real tokens is not supported: the prompt's "
                "last token must be real in every row, its real tokens contiguous (generate() pads on the left)"
            )
        if sketch is None:
            sketch = layer_sketch(q, k, config, layer_idx, key_valid=key_valid, scale=scale, process_group=process_group)
        st = cls(
            config, layer_idx, batch=bsz, q_heads=sketch.q_means.shape[1], k_heads=sketch.k_means.shape[1],
            head_dim=d, scale=scale, kv_tokens=kv_tokens, device=q.device,
            growable=True if growable is None else growable, process_group=process_group,
            kv_heads=k.shape[1], key_dtype=k.dtype,
        )
        nb = sketch.counts.shape[1]
        counts = sketch.counts
        st.k_sum[:, :, :nb] = sketch.k_means * counts[:, None, :, None]
        st.k_count[:, :nb] = counts
        st.k_sketch[:, :, :nb] = sketch.k_sketch
        st.transition[:, :nb, :nb] = sketch.transition
        if st.k_bounds is not None:
            kmax, kmin = block_key_bounds(k, config.block_size, key_valid)
            st.k_bounds[:, :, :nb] = torch.cat([kmax, -kmin], -1)
        st.q_sum = packed(sketch.q_means[:, :, nb - 1] * counts[:, nb - 1, None, None])
        st.q_count = packed(counts[:, nb - 1])
        if key_valid is not None:
            st.key_start = key_bounds(key_valid)[0]
        st.pos.fill_(n)
        st.length = n
        st.prompt_length = n
        st.last_key = packed(k[:, :, n - 1])
        st.pin(q, k, key_valid=key_valid, softcap=softcap)
        return st

    def pin(self, q: torch.Tensor, k: torch.Tensor, *, key_valid: torch.Tensor | None = None,
            softcap: float | None = None) -> None:
        """Pin the prompt blocks that its last queries attend most (config.decode_pinned).

        q: [B, Hq, L, D], the prompt's last L queries (L >= 1; the last block_size are used);
        k: [B, Hkv, n, D], every key of the prompt so far (n = the state's length); key_valid:
        [B, n] bool.  The ceil(decode_pinned * real blocks) blocks with the largest exact
        attention mass (mean over heads and queries) are then kept in every decode step, the
        way sink and local blocks are.  The prompt's last query block attends densely in the
        prefill (dense_tail_blocks), so these are the blocks the answer's first token read
        most; a decode query's head-mean estimate against block-mean keys ranks a needle of a
        few tokens poorly (docs/decode.md).  Exact, chunked over keys: no [n, n] tensor.
        """
        n = k.shape[2]
        if n != self.length:
            raise ValueError(f"k has {n} positions; pin needs every key the state has absorbed ({self.length})")
        self.pinned.zero_()
        if self.config.decode_pinned <= 0:
            return
        mass = prompt_block_mass(q, k, block_size=self.block_size, scale=self.scale, softcap=softcap,
                                 key_valid=key_valid, process_group=self.process_group)
        nb = mass.shape[1]
        self.pinned[:, :nb] = top_fraction(mass, self.k_count[:, :nb] > 0, self.config.decode_pinned)

    # ------------------------------------------------------------------ update
    def absorb(self, q_new: torch.Tensor, k_new: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add L new tokens (q_new [B, Hq, L, D], k_new [B, Hkv, L, D]) at positions length..length+L-1.

        valid: [B, L] bool (False: padding, kept out of every mean).  Touches the rows and
        columns of the at most L // block_size + 2 blocks the tokens fall in; no host sync.
        """
        bsz, _, L, d = q_new.shape
        if bsz != self.batch or d != self.head_dim:
            raise ValueError(
                f"q_new {tuple(q_new.shape)} does not fit this DecodeState (batch={self.batch}, head_dim={self.head_dim})"
            )
        if self.length + L > self.kv_tokens:
            self.grow(bucket_length(self.length + L + 1))
        self.captured_step = None  # the tensors below are replaced: a captured step would read the old ones
        qm = head_reduce(q_new, self.config.head_scoring)
        km = head_reduce(k_new, self.config.head_scoring)
        if self.process_group is not None:
            qm, km = group_mean(qm, self.process_group), group_mean(km, self.process_group)
        vf = torch.ones(bsz, L, device=self.device) if valid is None else valid.to(self.device, torch.float32)
        q_sum, q_count = absorb_tokens(
            self.k_sum, self.k_count, self.k_sketch, self.transition, self.q_sum, self.q_count, self.pos,
            qm, km, vf, self.sketch, self.block_size, self.scale, float(self.config.sparsity_exponent),
            self.k_bounds, k_new,
        )
        self.q_sum, self.q_count = packed(q_sum), packed(q_count)
        self.pos += L
        self.length += L
        self.last_key = packed(k_new[:, :, -1])


def absorb_tokens(k_sum, k_count, k_sketch, trans, q_sum, q_count, pos, qm, km, vf, p, bs, scale, exponent,
            k_bounds=None, k_new=None):
    """In-place state update for L tokens at positions pos..pos+L-1; returns the new (q_sum, q_count).

    k_bounds: the key bounds (decode_scoring="bound"), updated from k_new [B, Hkv, L, D]."""
    bsz, hq, L, d = qm.shape
    c = k_count.shape[1]
    dev = qm.device
    ar = torch.arange(L, device=dev)
    blk = (pos + ar) // bs  # [L] block of each new token
    k_sum.index_add_(2, blk, km * vf[:, None, :, None])
    k_count.index_add_(1, blk, vf)
    if k_bounds is not None:
        absorb_bounds(k_bounds, k_new, blk, vf)
    nt = (L + bs - 2) // bs + 1  # blocks the L tokens can touch
    b0 = pos // bs
    first = b0 + torch.arange(nt, device=dev)  # [nt], may run past the last block
    last = (pos + L - 1) // bs
    live = first <= last  # touched for real
    tb = first.clamp_max(c - 1)
    keep = live.float()
    # Sketched keys of the touched blocks (an index_add of the change: repeated clamped
    # indices then add zero instead of racing).
    km_mean = k_sum.index_select(2, tb) / k_count.index_select(1, tb).clamp_min(1.0)[:, None, :, None]
    new_ks = km_mean @ p
    k_sketch.index_add_(2, tb, (new_ks - k_sketch.index_select(2, tb)) * keep[None, None, :, None])
    # Query means of the touched blocks: this call's queries plus the carried partial block.
    rel = blk - b0
    qloc = torch.zeros(bsz, hq, nt, d, device=dev).index_add_(2, rel, qm * vf[:, None, :, None])
    qcnt = torch.zeros(bsz, nt, device=dev).index_add_(1, rel, vf)
    carry = (pos % bs != 0).float()
    qloc[:, :, 0] += carry * q_sum
    qcnt[:, 0] += carry * q_count
    q_mean = qloc / qcnt.clamp_min(1.0)[:, None, :, None]
    # Rows of W for the touched query blocks: causal, real key blocks only (empty -> diagonal).
    allowed = block_causal_mask(k_count > 0, tb)
    rows = transition_rows(q_mean @ p, k_sketch, allowed, scale, exponent)  # [B, nt, C]
    trans.index_add_(1, tb, (rows - trans.index_select(1, tb)) * keep[None, :, None])
    lr = (last - b0).reshape(1)
    return qloc.index_select(2, lr)[:, :, 0], qcnt.index_select(1, lr)[:, 0]


def absorb_bounds(k_bounds: torch.Tensor, k_new: torch.Tensor, blk: torch.Tensor, vf: torch.Tensor) -> None:
    """k_bounds [B, Hkv, C, 2D] <- max with [k, -k] of the new keys k_new [B, Hkv, L, D] in their
    blocks blk [L]; vf [B, L]: 0 for padding, which never enters a bound."""
    kn = k_new.to(k_bounds.dtype)
    src = torch.cat([kn, -kn], -1).masked_fill(~(vf[:, None, :, None] > 0), float("-inf"))
    k_bounds.scatter_reduce_(2, blk[None, None, :, None].expand_as(src), src, "amax")
