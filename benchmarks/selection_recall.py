"""How much of the dense attention mass different block choices keep, on a real model (CPU or GPU).

One dense forward records every layer's q and k (flexwalk.niah.fidelity.capture_attention_inputs).
For each full-attention layer from `dense_layers` on, the exact attention mass of every
(query block, key block) pair is computed per query head; then each block score below picks the
top blocks of every query block under the library's budget rule (selection.topk.kept_blocks, sink 1,
local 1, the last query block dense), and the recall is the share of the heads' mass inside them.

Scores (no walk: one layer at a time):
  mean        head-mean block-mean q . head-mean block-mean k: SketchWalk's estimate with an exact
              sketch, before the softmax and the walk (which do not change a row's order)
  minmax      head-mean block-mean q against each key block's per-channel max/min (Quest's bound)
  keylse      log-sum-exp over each block's keys of (block-mean q . k): the block's mass for the
              mean query (nb x n dot products)
  qtok        every head-mean query token against the block-mean keys, a softmax over its causal
              key blocks (log of each block's key count added), summed over the query block's
              tokens (n x nb dot products): block means on the key side only
  oracle      the heads' mean exact mass (walk="oracle": the shared-selection upper bound)
  oracle_kv   exact mass chosen per KV head (each group of query heads its own blocks)
  oracle_q    exact mass chosen per query head

  PYTHONPATH=. python benchmarks/selection_recall.py --model smollm2-135m --data DATA/smollm2-135m \
      --length 2k --tasks niah_single_2,niah_multikey_1,niah_multivalue --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from flexwalk import SketchWalkConfig
from flexwalk.selection.topk import kept_blocks
from flexwalk.models import load_model
from flexwalk.niah.dataset import dataset_path, parse_length, read_jsonl
from flexwalk.niah.fidelity import capture_attention_inputs

SCORES = ("mean", "minmax", "keylse", "qtok", "oracle", "oracle_kv", "oracle_q")


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, bs: int, chunk: int = 1024) -> torch.Tensor:
    """[Hq, nb, nb] exact causal softmax mass of each (query block, key block) pair, per query head."""
    hq, n, _ = q.shape
    kk = k.repeat_interleave(hq // k.shape[0], 0)
    nb = -(-n // bs)
    mass = torch.zeros(hq, nb, nb, device=q.device)
    for i0 in range(0, n, chunk):
        rows = torch.arange(i0, min(i0 + chunk, n), device=q.device)
        s = (q[:, rows] @ kk.transpose(-1, -2)) * scale
        s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows[:, None], float("-inf"))
        p = F.pad(s.softmax(-1), (0, nb * bs - n)).reshape(hq, len(rows), nb, bs).sum(-1)
        mass.index_add_(1, rows // bs, p)
    return mass


def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, bs: int) -> dict[str, torch.Tensor]:
    """Estimated [nb, nb] scores of head-mean q and k (see the module doc)."""
    n, d = q.shape[1], q.shape[2]
    nb = -(-n // bs)
    count = torch.clamp(n - torch.arange(nb, device=q.device) * bs, max=bs).float()[:, None]
    qm = F.pad(q.mean(0), (0, 0, 0, nb * bs - n)).reshape(nb, bs, d)
    km = F.pad(k.mean(0), (0, 0, 0, nb * bs - n)).reshape(nb, bs, d)
    real = (torch.arange(nb * bs, device=q.device) < n).reshape(nb, bs, 1)
    qb, kb = qm.sum(1) / count, km.sum(1) / count
    kmax = km.masked_fill(~real, -1e4).amax(1)
    kmin = km.masked_fill(~real, 1e4).amin(1)
    dots = torch.einsum("id,jtd->ijt", qb, km) * scale  # [nb, nb, bs]
    tok = torch.einsum("itd,jd->itj", qm, kb) * scale + count[:, 0].log()  # [nb, bs, nb]
    ib = torch.arange(nb, device=q.device)
    tok = tok.masked_fill(ib[None, None, :] > ib[:, None, None], float("-inf"))
    qtok = (tok.softmax(-1) * real).sum(1)  # padded query rows add nothing
    return {
        "mean": qb @ kb.T * scale,
        "minmax": (qb.clamp(min=0) @ kmax.T + qb.clamp(max=0) @ kmin.T) * scale,
        "keylse": dots.masked_fill(~real[None, :, :, 0], float("-inf")).logsumexp(-1),
        "qtok": qtok,
    }


def top_blocks(score: torch.Tensor, config: SketchWalkConfig) -> torch.Tensor:
    """[X, nb, nb] bool: per query block, sink 0 and the diagonal, then the top of `score` up to the
    budget; the last query block keeps every causal block."""
    x, nb, _ = score.shape
    causal = torch.ones(nb, nb, dtype=torch.bool, device=score.device).tril()
    sc = score.float().masked_fill(~causal, float("-inf")).clone()
    idx = torch.arange(nb, device=score.device)
    sc[:, :, 0] = float("inf")
    sc[:, idx, idx] = float("inf")
    out = torch.zeros(x, nb, nb, dtype=torch.bool, device=score.device)
    for i in range(nb):
        kept = i + 1 if i == nb - 1 else int(kept_blocks(torch.tensor(i + 1), torch.tensor(min(i + 1, 2)), top_k=config.top_k_blocks,
                                                              density=config.density))
        out[:, i].scatter_(-1, sc[:, i, : i + 1].topk(kept, -1).indices, True)
    return out


def layer_recall(q, k, scale, config: SketchWalkConfig) -> dict[str, float]:
    bs = config.block_size
    mass = block_mass(q, k, scale, bs)  # [Hq, nb, nb]
    hq, hk = q.shape[0], k.shape[0]
    picks = {name: top_blocks(s[None], config) for name, s in block_scores(q, k, scale, bs).items()}
    picks["oracle"] = top_blocks(mass.mean(0, keepdim=True), config)
    picks["oracle_kv"] = top_blocks(mass.reshape(hk, hq // hk, *mass.shape[1:]).mean(1), config).repeat_interleave(
        hq // hk, 0)
    picks["oracle_q"] = top_blocks(mass, config)
    total = mass.sum()
    return {name: float((mass * sel).sum() / total) for name, sel in picks.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, required=True, help="the model's root written by `flexwalk niah generate`")
    ap.add_argument("--length", default="2k")
    ap.add_argument("--tasks", default="niah_single_2,niah_multikey_1,niah_multivalue")
    ap.add_argument("--config", default="{}", help="JSON fields of SketchWalkConfig (block_size, density, dense_layers)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    config = SketchWalkConfig(**json.loads(args.config))
    model, tok = load_model(args.model, attn_implementation="sdpa", device=args.device)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    layers = [i for i, t in enumerate(types) if t == "full_attention" and i >= config.dense_layer_count]
    rows = []
    with torch.no_grad():
        for task in args.tasks.split(","):
            rec = next(iter(read_jsonl(dataset_path(args.data, parse_length(args.length), task))))
            ids = torch.tensor([tok(rec["input"] + rec.get("answer_prefix", "")).input_ids])
            inputs, _ = capture_attention_inputs(model, ids, logits_to_keep=1)
            for li in layers:
                x = inputs[li]
                q, k = x.q[0].float(), x.k[0].float()
                r = layer_recall(q, k, x.scale or q.shape[-1] ** -0.5, config)
                rows.append({"task": task, "layer": li, "tokens": q.shape[1], **r})
                print(task, li, " ".join(f"{s} {r[s]:.3f}" for s in SCORES), flush=True)
    mean = {s: sum(r[s] for r in rows) / len(rows) for s in SCORES}
    print("mean", " ".join(f"{s} {mean[s]:.3f}" for s in SCORES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "length": args.length, "config": config.to_dict(),
                                    "rows": rows, "mean": mean}, indent=1))


if __name__ == "__main__":
    main()
