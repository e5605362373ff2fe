"""Session 28: recall of the dense attention mass under the row budget and a layer-wide budget.

For each sparse layer of one prompt per task, the damped walk's and one-hop's rows R_l pick
blocks under the library's row rule (select_blocks), then the same number of blocks in all is
re-spread over the layer: forced blocks (sink, diagonal, the dense last row) first, then the
highest R_l ** power (rows normalised to 1) anywhere in the layer.  Recall: the share of the
heads' exact mass inside the selection.

  PYTHONPATH=. python docs/data/niah/session28/layer_budget_recall.py '{}' 2k DATA/smollm2-135m [NUM_TASKS] [MODEL]
"""
import json, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_select import global_sel
from selection_recall import block_mass
from flexwalk import SketchWalkConfig
from flexwalk.selection import layer_sketch
from flexwalk.walk import walk_combine, select_blocks
from flexwalk.models import load_model
from flexwalk.niah.data import dataset_path, parse_length, read_jsonl
from flexwalk.niah.fidelity import capture_attention_inputs
cfg = SketchWalkConfig(**json.loads(sys.argv[1]))
length, root = sys.argv[2], sys.argv[3]
ntask = int(sys.argv[4]) if len(sys.argv) > 4 else 3
bs = cfg.block_size
model, tok = load_model(sys.argv[5] if len(sys.argv) > 5 else "smollm2-135m", attn_implementation="sdpa")
tasks = ["niah_single_2", "niah_multikey_1", "niah_multivalue"][:ntask]

rows = []
with torch.no_grad():
    for task in tasks:
        rec = next(iter(read_jsonl(dataset_path(root, parse_length(length), task))))
        ids = torch.tensor([tok(rec["input"] + rec.get("answer_prefix", "")).input_ids])
        inputs, _ = capture_attention_inputs(model, ids, logits_to_keep=1)
        prev = {m: None for m in ("damped", "one_hop")}
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(inputs)
        for li in range(len(inputs)):
            if types[li] != "full_attention" or li < cfg.dense_layer_count:
                continue
            x = inputs[li]
            q, k = x.q.float(), x.k.float()
            scale = x.scale or q.shape[-1] ** -0.5
            mass = block_mass(q[0], k[0], scale, bs)
            total = mass.sum()
            rec_ = lambda sel: float((mass * sel).sum() / total)
            sk = layer_sketch(q, k, cfg, li, scale=scale)
            nb = sk.transition.shape[-1]
            causal = torch.ones(nb, nb, dtype=torch.bool).tril()
            idx = torch.arange(nb)
            forced = torch.zeros(nb, nb, dtype=torch.bool); forced[:, 0] = True; forced[idx, idx] = True
            forced[nb - 1] = True; forced &= causal
            r = {"task": task, "layer": li}
            for mode in ("damped", "one_hop"):
                R = walk_combine(sk.transition, prev[mode], sk.transition, mode, cfg.damping, 1)
                prev[mode] = R
                fixed = select_blocks(R, sk.allowed, sk.block_valid, cfg, q.shape[2]).mask[0]
                K = int(fixed.sum())
                r[f"{mode}_fixed"] = rec_(fixed)
                for pw in (1.0, 0.5, 0.25):
                    P = R[0].clamp_min(0) ** pw
                    P = P / P.sum(-1, keepdim=True)
                    r[f"{mode}_glob{pw:g}"] = rec_(global_sel(P, K, forced))
            rows.append(r)
            print(task, li, " ".join(f"{a} {b:.3f}" for a, b in r.items() if isinstance(b, float)), flush=True)
keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
print("MEAN", " ".join(f"{k} {sum(r[k] for r in rows)/len(rows):.4f}" for k in keys))
