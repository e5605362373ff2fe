"""Sparse decode: per-layer SketchWalk state carried across generation steps (ALGORITHM.md, Decode).

A `DecodeState` is built from a layer's prefill (`DecodeState.from_prefill`) and then absorbs
every new token (`absorb`): running sums and counts of head-mean keys per block, the sketched
block keys, the running query sum of the current block and the layer's block transition
matrix W_l.  A step touches one block row and one block column, O(nb * r) work; no step reads
K again.  `sketchwalk_decode` runs one decode step of one layer: absorb the new token, score
it against the sketched keys, walk (the row handed over from the previous sparse layer of the
same step), keep sink + current block + top-k, and attend with a one-row BlockMask.

Shapes are fixed by the state's capacity (`kv_tokens`): the mask is as wide as the capacity and
the live length is a tensor, so steps never recompile.  With a static cache the capacity is the
cache itself; with a growing (dynamic) cache K/V are padded up to the capacity and the
capacity grows in length buckets (block_mask.bucket_length).

Every tensor here is [B, heads, nb, D], [B, nb, r] or [B, nb, nb]: no token x token tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from . import stats
from .block_mask import _HAS_COMPUTE_Q_BLOCKS, bucket_length, contiguous_rows, key_bounds, packed
from .config import SketchWalkConfig
from .selection import LayerSketch, _group_mean, head_reduce, layer_sketch, sketch_matrix, transition_rows
from .sketch import block_causal_mask, effective_sketch_dim, num_blocks
from .walk import fraction_count, rank_blocks, walk_combine

_INT = torch.int32


class DecodePaddingError(NotImplementedError):
    """A prompt whose padding sparse decode cannot follow: padded on the right (decode would append
    after the padding) or with padding between real tokens (the decode masks bound each row's
    real keys by one start)."""


def _check_walk_row(walk_row: torch.Tensor | None, batch: int, capacity: int) -> None:
    if walk_row is not None and walk_row.shape != (batch, capacity):
        raise ValueError(
            f"walk_row has shape {tuple(walk_row.shape)}, this layer's state needs {(batch, capacity)}: "
            "pass the row returned by the previous sparse layer of the same step"
        )


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
        self.key_start = torch.zeros(batch, dtype=_INT, device=device)
        self.pos = torch.zeros((), dtype=torch.int64, device=device)
        self.length = 0
        self.last_key: torch.Tensor | None = None
        self.stale = torch.zeros((), dtype=torch.bool, device=device)
        self.stale_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._prev_and_new = torch.tensor([1, 0], device=device)  # offsets from pos: last absorbed, new
        self._graph: _StepGraph | None = None  # the captured step (CUDA, fixed-size cache)

    def _zero_blocks(self, kv_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero full-block tensors shaped for this capacity, allocated once."""
        z = getattr(self, "_zeros", None)
        if z is None or z[1].shape[-1] != kv_idx.shape[-1]:
            bsz, c = kv_idx.shape
            z = (torch.zeros(bsz, 1, 1, dtype=_INT, device=self.device),
                 torch.zeros(bsz, 1, 1, c, dtype=_INT, device=self.device))
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
        self._graph = None
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
        self._graph = None  # the tensors below are replaced: a captured step would read the old ones
        qm = head_reduce(q_new, self.config.head_scoring)
        km = head_reduce(k_new, self.config.head_scoring)
        if self.process_group is not None:
            qm, km = _group_mean(qm, self.process_group), _group_mean(km, self.process_group)
        vf = torch.ones(bsz, L, device=self.device) if valid is None else valid.to(self.device, torch.float32)
        q_sum, q_count = _absorb(
            self.k_sum, self.k_count, self.k_sketch, self.transition, self.q_sum, self.q_count, self.pos,
            qm, km, vf, self.sketch, self.block_size, self.scale, float(self.config.sparsity_exponent),
            self.k_bounds, k_new,
        )
        self.q_sum, self.q_count = packed(q_sum), packed(q_count)
        self.pos += L
        self.length += L
        self.last_key = packed(k_new[:, :, -1])


def _absorb(k_sum, k_count, k_sketch, trans, q_sum, q_count, pos, qm, km, vf, p, bs, scale, exponent,
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
        _absorb_bounds(k_bounds, k_new, blk, vf)
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


def _absorb_bounds(k_bounds: torch.Tensor, k_new: torch.Tensor, blk: torch.Tensor, vf: torch.Tensor) -> None:
    """k_bounds [B, Hkv, C, 2D] <- max with [k, -k] of the new keys k_new [B, Hkv, L, D] in their
    blocks blk [L]; vf [B, L]: 0 for padding, which never enters a bound."""
    kn = k_new.to(k_bounds.dtype)
    src = torch.cat([kn, -kn], -1).masked_fill(~(vf[:, None, :, None] > 0), float("-inf"))
    k_bounds.scatter_reduce_(2, blk[None, None, :, None].expand_as(src), src, "amax")


def block_key_bounds(k: torch.Tensor, block_size: int, key_valid: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, min) [B, Hkv, nb, D] in k's dtype: the channel-wise extremes of each block's real
    keys (k [B, Hkv, n, D]; key_valid [B, n] bool).  A block with no real key is -inf / +inf."""
    bsz, h, n, d = k.shape
    nb = -(-n // block_size)
    pad = nb * block_size - n
    real = torch.ones(bsz, n, dtype=torch.bool, device=k.device) if key_valid is None else key_valid.bool()
    real = F.pad(real.expand(bsz, n), (0, pad), value=False).reshape(bsz, 1, nb, block_size, 1)
    kb = F.pad(k, (0, 0, 0, pad)).reshape(bsz, h, nb, block_size, d)
    return kb.masked_fill(~real, float("-inf")).amax(3), kb.masked_fill(~real, float("inf")).amin(3)


def bound_rows(q: torch.Tensor, k_bounds: torch.Tensor, allowed: torch.Tensor, scale: float,
               softcap: float | None = None) -> torch.Tensor:
    """The decode row of decode_scoring="bound": [B, 1, C] fp32.

    q: [B, Hq, 1, D]; k_bounds: [B, Hkv, C, 2D], [max k, -min k] per block (query head h reads
    KV head h // (Hq / Hkv)); allowed: [B, 1, C] bool.  For each head, bound[c] = sum_d
    max(q_d * max_d, q_d * min_d) >= q . k for every key k of block c, so scale * bound
    (soft-capped like the model's logits, a monotone map) bounds the block's largest logit; the
    row is the mean over heads of softmax over the allowed blocks."""
    a = bound_logits(q, k_bounds, allowed[:, 0], scale, softcap, fill=float("-inf"))  # [B, Hkv, G, C]
    return torch.softmax(a, -1).nan_to_num(0.0).mean((1, 2))[:, None]


def bound_logits(q: torch.Tensor, k_bounds: torch.Tensor, live: torch.Tensor, scale: float,
                 softcap: float | None = None, fill: float = 0.0) -> torch.Tensor:
    """[B, Hkv, G, C] fp32: scale * sum_d max(q_d * max_d, q_d * min_d), soft-capped, for query
    head kv_head * G + g (q [B, Hq, 1, D]); `fill` where live [B, C] is False (blocks with no
    key hold -inf, which gives nan there: filled after the softcap, so -inf stays -inf).

    max(q_d max_d, q_d min_d) = relu(q_d) max_d + relu(-q_d) (-min_d): one product of
    [relu(q), relu(-q)] with k_bounds' [max, -min]."""
    bsz, hq, _, d = q.shape
    hkv = k_bounds.shape[1]
    qg = q.float().reshape(bsz, hkv, hq // hkv, d)
    qc = torch.cat([qg.clamp_min(0.0), (-qg).clamp_min(0.0)], -1)  # [B, Hkv, G, 2D]
    a = torch.matmul(qc, k_bounds.float().transpose(-1, -2)) * scale
    if softcap:
        a = softcap * torch.tanh(a / softcap)
    return a.masked_fill(~live[:, None, None, :], fill)


def prompt_block_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float, softcap: float | None = None,
                      key_valid: torch.Tensor | None = None, queries: int | None = None, process_group=None,
                      chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """[B, nb] fp32: the exact causal attention mass each key block gets from the last
    `queries` (default block_size) of q's tokens, averaged over heads and real queries.

    q: [B, Hq, L, D], the last L positions of the sequence; k: [B, Hkv, n, D]; key_valid:
    [B, n] bool (padded keys get no mass, padded queries no weight).  Exact softmax, computed
    in key chunks of at most `chunk_bytes` of fp32 logits: the only large tensor is
    [B, Hq * queries, chunk].  process_group: the mean over the heads of every rank.
    """
    bsz, hq, lq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    t = min(lq, queries or block_size, n)
    g = hq // hkv
    qg = q[:, :, lq - t:].reshape(bsz, hkv, g * t, d)  # query heads h = kv_head * g + j
    qpos = (n - t + torch.arange(t, device=q.device)).repeat(g)  # [g * t]
    nb = -(-n // block_size)
    chunk = max(block_size, chunk_bytes // (4 * bsz * hq * t) // block_size * block_size)
    parts = []
    for s0 in range(0, n, chunk):
        kc = k[:, :, s0:s0 + chunk]
        c = kc.shape[2]
        logits = torch.matmul(qg, kc.transpose(-1, -2)).float() * scale  # [B, Hkv, g*t, c]
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        ok = (s0 + torch.arange(c, device=q.device))[None, :] <= qpos[:, None]  # causal, [g*t, c]
        ok = ok[None, None] if key_valid is None else ok[None, None] & key_valid[:, None, None, s0:s0 + c]
        logits = logits.masked_fill(~ok, float("-inf"))
        pad = -c % block_size
        if pad:
            logits = F.pad(logits, (0, pad), value=float("-inf"))
        parts.append(logits.reshape(bsz, hkv, g * t, -1, block_size).logsumexp(-1))
    blse = torch.cat(parts, -1)[..., :nb]  # [B, Hkv, g*t, nb] log-mass per block
    mass = torch.exp(blse - blse.logsumexp(-1, keepdim=True)).nan_to_num(0.0)  # rows with no key: 0
    w = torch.ones(bsz, t, device=q.device) if key_valid is None else key_valid[:, n - t:].float()
    w = w.repeat(1, g)  # [B, g*t]
    mass = (mass * w[:, None, :, None]).sum(2) / w.sum(-1).clamp_min(1.0)[:, None, None]  # [B, Hkv, nb]
    mass = mass.mean(1)
    if process_group is not None:
        mass = _group_mean(mass, process_group)
    return mass


def top_fraction(score: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """[B, nb] bool: the ceil(fraction * valid blocks) valid blocks of each row with the largest
    score (ties towards the lower index).  No host sync."""
    nb = score.shape[-1]
    count = fraction_count(valid.sum(-1), fraction)  # [B]
    order = torch.sort(score.float().masked_fill(~valid, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb, device=score.device).expand_as(order))
    return (rank < count[:, None]) & valid


def _select_core(k_sketch, k_count, trans, p, qm, walk_row, p_tok, dense, pinned, *, bs, scale, exponent, walk_mode,
                 damping, walk_steps, sink_blocks, local_blocks, top_k, density, q=None, k_bounds=None,
                 softcap=None, w=None):
    """Tensor core of the decode selection (compiled on CUDA together with the state update).
    k_bounds given (decode_scoring="bound"): the token's row is `bound_rows` of q [B, Hq, 1, D];
    w [B, 1, C]: the token's row computed already (tensor parallelism: reduced over the group)."""
    c = k_count.shape[1]
    idx = torch.arange(c, device=k_count.device)
    bt = (p_tok // bs).reshape(1)
    block_valid = k_count > 0
    allowed = block_causal_mask(block_valid, bt)  # [B, 1, C]
    if w is None:  # [B, 1, C]
        w = (transition_rows(qm @ p, k_sketch, allowed, scale, exponent) if k_bounds is None
             else bound_rows(q, k_bounds, allowed, scale, softcap))
    prev = None if walk_row is None else walk_row[:, None, :]
    row = walk_combine(w, prev, trans, walk_mode, damping, walk_steps)
    kept, order, n_causal = rank_blocks(row, allowed, block_valid, bt, sink_blocks=sink_blocks,
                                        local_blocks=local_blocks, top_k=top_k, density=density, pinned=pinned)
    row, kept, order, n_causal = row[:, 0], kept[:, 0], order[:, 0].to(_INT), n_causal[:, 0]
    if dense is not None:
        kept = torch.where(dense, (bt + 1).to(kept.dtype).expand_as(kept), kept)
        order = torch.where(dense, idx.to(_INT)[None, :].expand_as(order), order)
    return row, kept.to(_INT), order, kept.float(), n_causal.float()


def _consts(state: "DecodeState") -> dict:
    cfg = state.config
    return dict(
        bs=state.block_size, scale=state.scale, exponent=float(cfg.sparsity_exponent), walk_mode=cfg.walk,
        damping=float(cfg.damping), walk_steps=cfg.walk_steps, sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
        top_k=cfg.top_k_blocks, density=cfg.density,
    )


def decode_select(
    state: DecodeState,
    q_t: torch.Tensor,
    walk_row: torch.Tensor | None,
    *,
    dense: torch.Tensor | bool = False,
    position: torch.Tensor | None = None,
    softcap: float | None = None,
):
    """Selection for the token just absorbed (q_t [B, Hq, 1, D]).

    Returns (walk row [B, C], kv_num_blocks [B] int32, kv_indices [B, C] int32, kept [B],
    causal [B]).  dense: a bool (or 0-dim bool tensor) forcing every causal block (exact
    dense decode through the same kernel).  position: the token's position when it may
    differ from the state's (a static cache): blocks up to it are allowed.  softcap: the
    model's logit softcap (decode_scoring="bound" caps its bounds the same way).
    """
    _check_walk_row(walk_row, state.batch, state.capacity)
    p_tok = state.pos - 1 if position is None else position.reshape(()).to(torch.int64)
    dense_t = None if isinstance(dense, bool) and not dense else torch.as_tensor(dense, device=state.device)
    return _select_core(
        state.k_sketch, state.k_count, state.transition, state.sketch, head_reduce(q_t, state.config.head_scoring), walk_row,
        p_tok, dense_t, state.pinned, q=q_t, k_bounds=state.k_bounds, softcap=softcap, **_consts(state),
    )


def _cache_mismatch(k_rows, last_key, position, pos):
    """0-d bool: the cache's key at pos - 1 is not the one the state absorbed, or the step's
    position is not the state's."""
    bad = ~torch.eq(k_rows[:, :, 0], last_key).all()
    return bad if position is None else bad | (position != pos)


def _step_core(k_sum, k_count, k_sketch, trans, q_sum, q_count, pos, last_key, stale, stale_steps, all_stale_steps, q,
               k_rows, valid, walk_row, position, p, pinned, k_bounds, *, force_dense, head_scoring, softcap,
               reduced=None, **consts):
    """One decode step's state update and selection, tensors only (no host sync).

    k_rows: [B, Hkv, 2, D], the cache's keys at positions pos - 1 and pos (the last absorbed
    token and the new one).  Checks the cache against the state (key fingerprint, position),
    absorbs the new token in place and selects its blocks.  Returns the values that replace the state's small
    tensors and the selection.  reduced: (query head mean, key head mean, mismatch flag, the
    token's bound row or None) already reduced over a tensor-parallel group (then used instead
    of this rank's own; the bounds are then updated already).
    """
    k_new = k_rows[:, :, 1:]  # the cache's key at pos
    if reduced is None:
        bad = _cache_mismatch(k_rows, last_key, position, pos)
        qm, km = head_reduce(q, head_scoring), head_reduce(k_new, head_scoring)
        w_red, bounds = None, (k_bounds, k_new)
    else:  # the bounds were absorbed already, with the rank's share of the row (_tp_bound_row)
        qm, km, bad, w_red = reduced
        bounds = (None, None)
    stale = stale | bad
    stale_steps += stale.to(stale_steps.dtype)
    all_stale_steps += stale.to(stale_steps.dtype)
    bsz = q.shape[0]
    valid_f = torch.ones(bsz, 1, device=q.device) if valid is None else valid.to(torch.float32)
    q_sum, q_count = _absorb(k_sum, k_count, k_sketch, trans, q_sum, q_count, pos, qm, km, valid_f, p,
                             consts["bs"], consts["scale"], consts["exponent"], *bounds)
    new_pos = pos + 1
    p_tok = new_pos - 1 if position is None else position
    dense = stale | force_dense if not force_dense else torch.ones_like(stale)
    row, kv_num, kv_idx, kept, causal = _select_core(k_sketch, k_count, trans, p, qm, walk_row, p_tok, dense, pinned,
                                                     q=q, k_bounds=k_bounds, softcap=softcap,
                                                     w=w_red, **consts)
    return (q_sum.contiguous(), q_count.contiguous(), new_pos, k_new[:, :, 0].contiguous(), stale, row, kv_num,
            kv_idx, kept, causal, (p_tok + 1).to(_INT))


_compiled_step_core = torch.compile(_step_core, dynamic=False)
# The step is ~40 small kernels: compiled into a few fused ones on CUDA, where launches
# dominate.  On CPU the eager ops are cheap and compiling each shape would cost seconds.
COMPILE_STEP_ON_CPU = False


# Decode attention kernel: "auto" runs the split-KV Triton kernel (triton_decode.py) on CUDA
# where it supports the shapes and compiled flex with a one-row BlockMask elsewhere; "flex" and
# "triton" force one (tests run "triton" on CPU through triton's interpreter).
DECODE_KERNEL = "auto"
_KERNELS = ("auto", "flex", "triton")


def decode_kernel(q: torch.Tensor, block_size: int) -> str:
    """The kernel a decode step with this query runs: "triton" or "flex"."""
    from . import triton_decode

    if DECODE_KERNEL not in _KERNELS:
        raise ValueError(f"flexwalk.decode.DECODE_KERNEL={DECODE_KERNEL!r}; allowed: {', '.join(_KERNELS)}")
    if DECODE_KERNEL == "auto":
        return "triton" if q.device.type == "cuda" and triton_decode.supported(q, block_size) else "flex"
    return DECODE_KERNEL


def _step_fn(device: torch.device):
    return _compiled_step_core if device.type == "cuda" or COMPILE_STEP_ON_CPU else _step_core


def _tp_bound_row(state: DecodeState, q, k_new, valid, position, softcap) -> torch.Tensor:
    """Tensor parallelism, decode_scoring="bound": absorb the new key [B, Hkv, 1, D] into this
    rank's bounds and return its share of the token's row, [B, 1, C] (to be averaged over the
    group; the step core then skips the bounds).  The allowed blocks are the ones the step core
    will allow: real blocks up to the token's, the token's own block counted if it is real."""
    bs = state.block_size
    vf = torch.ones(q.shape[0], 1, device=q.device) if valid is None else valid.to(torch.float32)
    blk = state.pos // bs
    _absorb_bounds(state.k_bounds, k_new, blk.reshape(1), vf)
    idx = torch.arange(state.capacity, device=q.device)
    block_valid = (state.k_count > 0) | ((idx == blk)[None, :] & (vf > 0))
    p_tok = state.pos if position is None else position
    allowed = block_causal_mask(block_valid, (p_tok // bs).reshape(1))
    return bound_rows(q, state.k_bounds, allowed, state.scale, softcap)


def _step_inplace(state: DecodeState, q, k, v, walk_row, valid, pos_t, *, scale, softcap, force_dense, kernel):
    """One step writing the new state into the state's own tensors (fixed addresses, so a CUDA
    graph can replay it).  Returns (out [B, Hq, 1, D], walk row, kept, causal)."""
    from .attention import flex  # late import: attention imports this module's users

    bsz, hq, _, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    k_rows = k.index_select(2, state.pos - state._prev_and_new)
    reduced = None
    if state.process_group is not None:  # tensor parallelism: the group's head means, one staleness verdict
        import torch.distributed as dist

        group, head_scoring = state.process_group, state.config.head_scoring
        qm = _group_mean(head_reduce(q, head_scoring), group)
        km = _group_mean(head_reduce(k_rows[:, :, 1:], head_scoring), group)
        bad = _cache_mismatch(k_rows, state.last_key, pos_t, state.pos).to(torch.int32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        w_red = None
        if state.k_bounds is not None:  # each rank bounds its own heads: the row's head mean spans the group
            w_red = _group_mean(_tp_bound_row(state, q, k_rows[:, :, 1:], valid, pos_t, softcap), group)
        reduced = (qm, km, bad.reshape(()).bool(), w_red)
    (q_sum, q_count, pos, last_key, stale, row, kv_num, kv_idx, kept, causal, end) = _step_fn(q.device)(
        state.k_sum, state.k_count, state.k_sketch, state.transition, state.q_sum, state.q_count, state.pos,
        state.last_key, state.stale, state.stale_steps, stats.device_counter(stats.DECODE_STALE_STEPS, q.device), q,
        k_rows, valid, walk_row, pos_t, state.sketch, state.pinned, state.k_bounds,
        force_dense=force_dense, head_scoring=state.config.head_scoring, softcap=softcap, reduced=reduced,
        **_consts(state),
    )
    for dst, src in ((state.q_sum, q_sum), (state.q_count, q_count), (state.pos, pos), (state.last_key, last_key),
                     (state.stale, stale)):
        dst.copy_(src)
    if kernel == "triton":
        from .triton_decode import sparse_decode_attention

        # the kernel reads only the selected blocks of the cache as it is: no padding, no BlockMask
        out = sparse_decode_attention(q, k, v, kv_num, kv_idx, state.key_start, end, block_size=state.block_size,
                                      scale=scale, softcap=softcap)
    else:
        if s < state.kv_tokens:  # growing cache: pad to the capacity so shapes stay fixed
            k = F.pad(k, (0, 0, 0, state.kv_tokens - s))
            v = F.pad(v, (0, 0, 0, state.kv_tokens - s))
        g = hq // hkv
        bm = decode_block_mask(kv_num, kv_idx, state.key_start, end, rows=g, kv_tokens=state.kv_tokens,
                               block_size=state.block_size, zeros=state._zero_blocks(kv_idx))
        qv = q.reshape(bsz, hkv, g, d)  # the G query heads of each KV head as G query rows
        out = flex(qv, k, v, bm, scale=scale, softcap=softcap, block_size=state.block_size, decode=True)
        out = out.reshape(bsz, hq, 1, d)
    return out, row, kept, causal


# CUDA graphs: with a fixed-size (static) cache on CUDA and the Triton kernel, a state captures
# its whole step (state update, selection, attention) after its first step and replays it for
# every later one: one graph launch plus four small input copies instead of ~20 kernel
# launches and the Python around them.  False: never capture.
DECODE_GRAPHS = True


def _graphable(state: DecodeState, q: torch.Tensor, kw: dict) -> bool:
    return (DECODE_GRAPHS and q.device.type == "cuda" and not state.growable and kw["kernel"] == "triton"
            and state.last_key is not None and state.process_group is None and not torch.cuda.is_current_stream_capturing())


def _graph_key(k, v, walk_row, valid, pos_t, kw) -> tuple:
    """What a captured step is specialised to: the cache tensors themselves, which optional
    inputs are present (and their shapes), and the step's options."""
    shape = lambda t: None if t is None else (tuple(t.shape), t.dtype)  # noqa: E731
    return (k.data_ptr(), v.data_ptr(), shape(k), shape(v), shape(walk_row), shape(valid), shape(pos_t),
            tuple(sorted(kw.items())))


class _StepGraph:
    """One layer's decode step captured in a CUDA graph, replayed with fresh inputs."""

    def __init__(self, state: DecodeState, q, k, v, walk_row, valid, pos_t, kw):
        self.key = _graph_key(k, v, walk_row, valid, pos_t, kw)
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        self.q, self.walk_row, self.valid, self.pos = clone(q), clone(walk_row), clone(valid), clone(pos_t)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = _step_inplace(state, self.q, k, v, self.walk_row, self.valid, self.pos, **kw)

    def fits(self, k, v, walk_row, valid, pos_t, kw) -> bool:
        return _graph_key(k, v, walk_row, valid, pos_t, kw) == self.key

    def replay(self, q, walk_row, valid, pos_t):
        for dst, src in ((self.q, q), (self.walk_row, walk_row), (self.valid, valid), (self.pos, pos_t)):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        return self.outputs


def _decode_mask_mod(start: torch.Tensor, end: torch.Tensor, kept: torch.Tensor, block_size: int):
    """Keys in [start[b], end) of the selected blocks (kept [B, C] bool): left padding and
    unwritten cache slots are out.  The selection is in the mask_mod too, not only in the
    block tables: flex_attention run without compile (which dynamo falls back to once its
    recompile limit is reached) reads only the mask_mod, and would otherwise attend densely."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= start[b]) & (kv_idx < end) & kept[b, kv_idx // block_size]

    return mask_mod


def decode_block_mask(kv_num: torch.Tensor, kv_idx: torch.Tensor, start, end, *, rows: int, kv_tokens: int,
                      block_size: int, zeros: tuple[torch.Tensor, torch.Tensor] | None = None) -> BlockMask:
    """One-row BlockMask: `rows` query rows (the query heads of one KV head) share one selection.

    zeros: (full_kv_num_blocks, full_kv_indices) all-zero tensors to reuse (CPU flex needs them).
    """
    bsz, c = kv_idx.shape
    num = kv_num.reshape(bsz, 1, 1)
    ind = kv_idx.reshape(bsz, 1, 1, c)
    # [B, C] bool of the selected blocks (entries of kv_idx past kv_num are not selected)
    live = (torch.arange(c, device=kv_idx.device) < kv_num.reshape(bsz, 1)).to(torch.int32)
    kept = torch.zeros(bsz, c, dtype=torch.int32, device=kv_idx.device).scatter_add_(1, kv_idx.long(), live) > 0
    if zeros is None:
        zeros = (torch.zeros_like(num), torch.zeros_like(ind))
    # Forward-only: skip the q-major transpose (a scatter over all blocks, the costliest part of
    # building the mask on the host) where this torch can.
    extra = {"compute_q_blocks": False} if _HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        num, ind, zeros[0], zeros[1],  # no full blocks (every block checks [start, end))
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=_decode_mask_mod(start, end, kept, block_size),
        seq_lengths=(rows, kv_tokens),
        **extra,
    )


def sketchwalk_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: DecodeState,
    walk_row: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    valid: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
    dense: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of one sparse layer.  Returns (out [B, Hq, 1, D], walk row [B, C]).

    q: [B, Hq, 1, D]; k, v: [B, Hkv, S, D], the cache with the new token already written at
    index state.length (S = state.length + 1 for a growing cache, or the static cache size).
    walk_row: the row returned by the previous sparse layer of this step (None for the first).
    valid: [B, 1] bool validity of the new token.  position: 0-dim tensor with the new token's
    cache position when it is only known on the device (static caches).  If it differs from
    the state's, or the cache's key at the last absorbed position is not the one the state
    absorbed (another sequence's cache), the state is stale: this and every later step attend
    densely (exact), `state.stale_steps` and flexwalk.counters()["decode_stale_steps"] count
    them.  All of this stays on the device.
    dense: attend every causal block (still updates the state and the walk row).
    On CUDA with a fixed-size cache the step is captured in a CUDA graph after its first run
    and replayed (DECODE_GRAPHS; counted in flexwalk.counters()["decode_graph_steps"]).
    """
    bsz, _, L, _ = q.shape
    s = k.shape[2]
    if L != 1:
        raise ValueError(f"sketchwalk_decode takes one new token per row; q has {L} (use absorb + dense attention)")
    if s > state.kv_tokens:
        state.grow(bucket_length(s))
    if s < state.length + 1:
        raise ValueError(
            f"k has {s} positions but the state has absorbed {state.length} tokens: the new token must be in the cache"
        )
    _check_walk_row(walk_row, bsz, state.capacity)
    pos_t = None if position is None else position.reshape(()).to(torch.int64)
    kw = dict(scale=scale, softcap=softcap, force_dense=bool(dense), kernel=decode_kernel(q, state.block_size))
    graph = state._graph
    if graph is not None and graph.fits(k, v, walk_row, valid, pos_t, kw):
        out, row, kept, causal = graph.replay(q, walk_row, valid, pos_t)
        stats.count(stats.DECODE_GRAPH_STEPS)
    else:
        out, row, kept, causal = _step_inplace(state, q, k, v, walk_row, valid, pos_t, **kw)
        if _graphable(state, q, kw):  # warm now: capture this step for the next ones (records, runs nothing)
            state._graph = _StepGraph(state, q, k, v, walk_row, valid, pos_t, kw)
    state.length += 1
    stats.record_density(state.layer_idx, kept, causal, phase="decode")
    return out, row
