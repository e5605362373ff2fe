"""Selection, stage 2: the walk.  The layer's transition W_l and the previous sparse layer's walk
R_{l-1} -> this layer's walk matrix R_l, whose rows score the key blocks of each query block
(or, for walk="oracle", the exact block attention mass instead).

`WalkState` is the only thing carried from one sparse layer to the next inside one forward
pass.  Its lifetime is one forward (prefill) pass: the transformers integration keeps it on
the per-forward mask context, the functional API hands it back to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import SketchWalkConfig
from .sketch import num_blocks


@dataclass(frozen=True)
class WalkState:
    """Walk matrix R of the last sparse layer of this forward pass.

    transition: [B, nb, nb] fp32, row-stochastic and block-lower-triangular.
    """

    transition: torch.Tensor
    layer_idx: int
    block_size: int
    seq_len: int

    def check_compatible(self, batch: int, seq_len: int, block_size: int) -> None:
        if (self.transition.shape[0], self.seq_len, self.block_size) != (batch, seq_len, block_size):
            raise ValueError(
                f"state: WalkState from layer {self.layer_idx} was built for batch="
                f"{self.transition.shape[0]}, seq_len={self.seq_len}, block_size={self.block_size}; "
                f"this layer has batch={batch}, seq_len={seq_len}, block_size={block_size}. "
                "A WalkState lives for one forward pass: pass state=None to start a new one."
            )


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def walk_combine(w: torch.Tensor, prev: torch.Tensor | None, transition: torch.Tensor, mode: str,
                 damping: float, steps: int = 1) -> torch.Tensor:
    """The walk rule on rows: w (one_hop, or no previous layer), normalise(prev @ transition)
    (walk), or (1 - beta) w + beta normalise(prev @ transition) (damped), applied `steps` times
    with prev replaced by the result (config.walk_steps).

    Prefill: w = W_l, prev = R_{l-1}, transition = W_l.  Decode: w = the token's row,
    prev = the previous layer's row, transition = this layer's W_l.  All [B, m, nb].  A row of
    the result depends only on the same rows of w and prev, so decode's single row follows
    prefill's rule exactly.
    """
    if prev is None or mode == "one_hop":
        return w
    r = prev
    for _ in range(steps):
        walked = _normalise_rows(torch.bmm(r, transition))
        r = walked if mode == "walk" else (1.0 - damping) * w + damping * walked
    return r


def walk_step(w: torch.Tensor, state: WalkState | None, config: SketchWalkConfig) -> torch.Tensor:
    """R_l from this layer's transition W_l and the previous sparse layer's R_{l-1}."""
    prev = None if state is None else state.transition
    return walk_combine(w, prev, w, config.walk, config.damping, config.walk_steps)


def oracle_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Exact block attention mass, the 'oracle' selection's score (an evaluation upper bound).

    Entry [b, i, j]: the causal softmax attention of the real queries of block i on the keys of
    block j, summed over those queries, averaged over query heads, rows normalised to 1.
    O(n^2) work, computed in chunks of `chunk` query rows: memory is B x Hq x chunk x n, never
    n x n.  Returns [B, nb, nb] fp32.
    """
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    nb = num_blocks(n, block_size)
    chunk = max(block_size, chunk // block_size * block_size)
    valid = torch.ones(bsz, n, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.bool()
    kf = k.float().repeat_interleave(hq // hkv, dim=1)  # [B, Hq, n, D]
    keys = torch.arange(n, device=q.device)
    mass = torch.zeros(bsz, nb, nb, device=q.device)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        scores = torch.matmul(q[:, :, s0:s1].float(), kf.transpose(-1, -2)) * scale  # [B, Hq, c, n]
        rows = torch.arange(s0, s1, device=q.device)
        allowed = (keys[None, :] <= rows[:, None])[None] & valid[:, None, :] & valid[:, s0:s1, None]  # [B, c, n]
        probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
        per_key_block = F.pad(probs.mean(1), (0, nb * block_size - n)).reshape(bsz, s1 - s0, nb, block_size).sum(-1)
        qb0 = s0 // block_size
        rows_pad = -(-(s1 - s0) // block_size) * block_size
        summed = F.pad(per_key_block, (0, 0, 0, rows_pad - (s1 - s0))).reshape(bsz, -1, block_size, nb).sum(2)
        mass[:, qb0 : qb0 + summed.shape[1]] += summed
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
