"""Greedy answers of a packaged model with sdpa, sketchwalk_flex at full budget and at a given density,
on a batch of RULER prompts (left padding, dense decode): is a loss the selection's, or the integration's?

    python benchmarks/full_budget_generate.py --model gemma3-270m --data DATA --length 2048 \
        --task niah_single_1 --limit 6 [--density 0.2] [--new-tokens 12]

DATA is a `flexwalk niah generate` root for the model (DATA/<length>/data/<task>/validation.jsonl).
Prints each method's decoded answers and whether full budget reproduced sdpa token for token.
CPU, float32 (docs/results.md, "Gemma's worst task at full budget and at 30-50% density").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk.models import resolve_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--task", default="niah_single_1")
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    file = Path(args.data) / str(args.length) / "data" / args.task / "validation.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines()[: args.limit]]
    enc = tok([r["input"] + r["answer_prefix"] for r in rows], return_tensors="pt", padding=True)
    print(f"{len(rows)} prompts, {enc.input_ids.shape[1]} tokens (real: {enc.attention_mask.sum(1).tolist()})")
    print("targets:", [r["outputs"] for r in rows])
    outs = {}
    for name, density in (("sdpa", None), ("full budget", 1.0), (f"density {args.density}", args.density)):
        if density is None:
            model.set_attn_implementation("sdpa")
        else:
            flexwalk.configure(model, SketchWalkConfig(density=density, dense_below=512))
        flexwalk.reset_counters()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False)
        outs[name] = out[:, enc.input_ids.shape[1]:]
        print(f"{name}: {[tok.decode(x) for x in outs[name]]} {flexwalk.counters()}")
    same = bool(torch.equal(outs["full budget"], outs["sdpa"]))
    print(f"full budget reproduces sdpa token for token: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
