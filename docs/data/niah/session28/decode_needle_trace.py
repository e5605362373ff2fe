"""Session 28: the first decode steps of 4K niah_single_2 prompts under sparse decode: per sparse
layer, is the needle's block selected, is it pinned, and its rank in the step's row.

  PYTHONPATH=. python docs/data/niah/session28/decode_needle_trace.py '{"dense_below": 2048, "skip_decode": false}' \
      6,15 DATA/smollm2-135m/4096/data/niah_single_2/validation.jsonl
"""
import json, sys

import torch

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk import decode as D
from flexwalk.models import load_model
cfg = SketchWalkConfig(**json.loads(sys.argv[1]))
idxs = [int(x) for x in sys.argv[2].split(",")]
model, tok = load_model("smollm2-135m", sketchwalk=cfg)
rows = [json.loads(l) for l in open(sys.argv[3])]
captured = []
orig = D._select_core
def spy(*a, **kw):
    out = orig(*a, **kw)
    captured.append((out[0].detach().clone(), out[1].detach().clone(), out[2].detach().clone(), a[8].clone() if a[8] is not None else None))
    return out
D._select_core = spy
for r in rows:
    if r["index"] not in idxs: continue
    text = r["input"] + r.get("answer_prefix", "")
    enc = tok(text, return_offsets_mapping=True)
    ids = torch.tensor([enc.input_ids])
    needle = r["outputs"][0]
    pos = r["input"].find(needle)
    toks = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < pos + len(needle) and e > pos]
    nblk = sorted({t // cfg.block_size for t in toks})
    flexwalk.reset_decode_state(model)
    captured.clear()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    pred = tok.decode(out[0, ids.shape[1]:])
    n = ids.shape[1]; nb = -(-n // cfg.block_size)
    print(f"idx {r['index']} n {n} needle tokens {toks[:3]}.. blocks {nblk} pred {pred!r}")
    # captured per layer per step; first step = first len(layers) entries
    L = len(captured) // 2 if captured else 0
    for li, (row, kv_num, kv_idx, pinned) in enumerate(captured[:L]):
        sel = set(kv_idx[0, : int(kv_num[0])].tolist())
        pin = set(torch.nonzero(pinned[0]).flatten().tolist()) if pinned is not None else set()
        rank = (row[0] > row[0, nblk[0]]).sum().item()
        print(f"  L{li+2:02d} needle-in-sel {[b in sel for b in nblk]} pinned {[b in pin for b in nblk]} rank {rank} kept {len(sel)} pins {sorted(pin)}")
