"""How a decode token scores the key blocks, and which prompt blocks every step keeps.

decode_scoring="bound" (`bound_rows`): each query head against each block's channel-wise
maximum and minimum key, an upper bound on every logit in the block.  ("sketch" is the
prefill's rule on one row: selection.sketch.transition_rows.)  Pinned blocks
(config.decode_pinned): the blocks the prompt's last queries attend most, by exact attention
mass (`prompt_block_mass`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import group_mean
from ..selection.sketch import bound_product


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
    key hold -inf, which gives nan there: filled after the softcap, so -inf stays -inf);
    the product is selection.sketch.bound_product."""
    bsz, hq, _, d = q.shape
    hkv = k_bounds.shape[1]
    a = bound_product(q.reshape(bsz, hkv, hq // hkv, d), k_bounds) * scale  # [B, Hkv, G, C]
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
        mass = group_mean(mass, process_group)
    return mass
