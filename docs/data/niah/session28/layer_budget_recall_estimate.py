"""Session 28: recall at equal compute, one layer at a time (no walk): the row budget against
per-row top-p and a layer-wide threshold, on exact masses and on SketchWalk's block-mean estimate
softmax(e * A) at exponents e = 1, 2, 4, 8.

  PYTHONPATH=. python docs/data/niah/session28/layer_budget_recall_estimate.py '{}' DATA/smollm2-135m OUT.json
"""
import json, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_select import global_sel
from selection_recall import block_mass, block_scores, top_blocks
from flexwalk import SketchWalkConfig
from flexwalk.models import load_model
from flexwalk.niah.data import dataset_path, parse_length, read_jsonl
from flexwalk.niah.fidelity import capture_attention_inputs
torch.manual_seed(0)
cfg = SketchWalkConfig(**json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
bs = cfg.block_size
model, tok = load_model("smollm2-135m", attn_implementation="sdpa")
tasks = ["niah_single_2", "niah_multikey_1", "niah_multivalue"]

def forced_table(nb):
    idx = torch.arange(nb)
    f = torch.zeros(nb, nb, dtype=torch.bool)
    f[:, 0] = True; f[idx, idx] = True
    f[nb - 1, :] = True  # dense tail row
    return f & torch.ones(nb, nb, dtype=torch.bool).tril()

def topp_sel(prob, K, forced):
    """per-row: forced + smallest prefix (by prob) whose cumulative prob >= p; bisection on p for <=K total"""
    nb = prob.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    pr = prob.masked_fill(~causal, 0)
    sc = pr.masked_fill(forced, 2.0).masked_fill(~causal, -1.0)
    order = sc.sort(-1, descending=True).indices
    ps = pr.gather(-1, order).cumsum(-1)
    nf = forced.sum(-1)
    def sel(p):
        need = (ps < p).sum(-1) + 1
        kept = torch.maximum(nf, torch.minimum(need, causal.sum(-1)))
        kept[nb - 1] = nb
        t = torch.zeros(nb, nb, dtype=torch.bool)
        t.scatter_(-1, order, torch.arange(nb)[None, :] < kept[:, None])
        return t & causal
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if sel(mid).sum() <= K: lo = mid
        else: hi = mid
    return sel(lo)

rows = []
with torch.no_grad():
    for task in tasks:
        rec = next(iter(read_jsonl(dataset_path(sys.argv[2], parse_length("2k"), task))))
        ids = torch.tensor([tok(rec["input"] + rec.get("answer_prefix", "")).input_ids])
        inputs, _ = capture_attention_inputs(model, ids, logits_to_keep=1)
        for li in range(cfg.dense_layer_count, len(inputs)):
            x = inputs[li]
            q, k = x.q[0].float(), x.k[0].float()
            scale = x.scale or q.shape[-1] ** -0.5
            mass = block_mass(q, k, scale, bs)  # [Hq, nb, nb]
            hm = mass.mean(0)
            nb = hm.shape[-1]
            forced = forced_table(nb)
            causal = torch.ones(nb, nb, dtype=torch.bool).tril()
            est = block_scores(q, k, scale, bs)["mean"]
            fixed = top_blocks(est[None], cfg)[0]
            K = int(fixed.sum())
            total = mass.sum()
            rec_ = lambda sel: float((mass * sel).sum() / total)
            opr = hm / hm.sum(-1, keepdim=True)
            r = {"task": task, "layer": li, "K": K, "mean_fixed": rec_(fixed),
                 "oracle_fixed": rec_(top_blocks(hm[None], cfg)[0]),
                 "oracle_topp": rec_(topp_sel(opr, K, forced)), "oracle_global": rec_(global_sel(opr, K, forced))}
            for e in (1.0, 2.0, 4.0, 8.0):
                w = (est * e).masked_fill(~causal, float("-inf")).softmax(-1)
                r[f"topp_e{e:g}"] = rec_(topp_sel(w, K, forced))
                r[f"global_e{e:g}"] = rec_(global_sel(w, K, forced))
            rows.append(r)
            print(task, li, " ".join(f"{a} {b:.3f}" for a, b in r.items() if isinstance(b, float)), flush=True)
keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
print("MEAN", " ".join(f"{k} {sum(r[k] for r in rows)/len(rows):.4f}" for k in keys))
json.dump(rows, open(sys.argv[3], "w"))
