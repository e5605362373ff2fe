"""`flexwalk niah fidelity`: answer-free ablations of SketchWalk settings on a real model.

For each prompt (RULER data from `flexwalk niah generate`), one dense forward records every
layer's q, k, v; each configuration of the ablation grid is then replayed on those inputs
(flexwalk.niah.fidelity.layer_fidelity) and, unless --no-kl, run through the model for the
next-token KL against dense.  Writes OUT.json (every number) and OUT.md (one table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import PRESETS, SketchWalkConfig
from .data import TASKS, dataset_path, parse_length, read_jsonl
from .fidelity import capture_attention_inputs, layer_fidelity, next_token_kl

# One field varied at a time around the base preset (issue 4's ablation list).
ABLATIONS: dict[str, list[dict[str, Any]]] = {
    "density": [{"density": d} for d in (0.1, 0.2, 0.3, 0.5)],
    "walk": [{"walk": w} for w in ("walk", "damped", "one_hop", "oracle")],
    "sketch_dim": [{"sketch_dim": r} for r in (16, 32, 64, 128, 256)],  # capped at the head dim (Gemma 3: 256)
    "exponent": [{"sparsity_exponent": e} for e in (1.0, 4.0, 8.0, 16.0)],
    # 64 / 128 / 64x128: 64-token key blocks chosen per 128-row kernel query block (query_block_size)
    "block_size": [{"block_size": 64}, {"block_size": 128}, {"block_size": 64, "query_block_size": 128}],
    "dense_layers": [{"dense_layers": n} for n in (0, 1, 2)],
    "damping": [{"damping": b} for b in (0.0, 0.25, 0.5, 0.75)],
    "walk_steps": [{"walk_steps": s} for s in (1, 2, 3, 4)],  # with the base walk (damped): the authors' code uses 3
    "dense_tail": [{"dense_tail_blocks": t} for t in (0, 1, 2, 4)],
    "sink": [{"sink_blocks": n} for n in (1, 2, 4)],
    "local": [{"local_blocks": n} for n in (1, 2, 4)],
    "head_scoring": [{"head_scoring": h} for h in ("mean", "per_head")],
}


def grid(base: SketchWalkConfig, groups: list[str]) -> list[tuple[str, dict[str, Any], SketchWalkConfig]]:
    """(group, change, config) for every change of every group, applied to `base`."""
    return [(g, change, base.replace(**change)) for g in groups for change in ABLATIONS[g]]


def add_fidelity_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="smollm2-135m", help="packaged name or local model directory")
    parser.add_argument("--data", type=Path, required=True, help="root written by `flexwalk niah generate`")
    parser.add_argument("--tasks", default="niah_single_2", help="comma-separated tasks (default: %(default)s)")
    parser.add_argument("--lengths", default="2k", help="comma-separated lengths (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=2, help="prompts per task and length (default: %(default)s)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--config", default=None, help="JSON fields overriding the preset (the base of every ablation)")
    parser.add_argument("--groups", default=",".join(ABLATIONS),
                        help=f"ablation groups, comma-separated, from {', '.join(ABLATIONS)} (default: all)")
    parser.add_argument("--no-kl", action="store_true", help="skip the next-token KL (one model forward per config)")
    parser.add_argument("--out", type=Path, required=True, help="output path without extension (.json and .md written)")
    parser.add_argument("--device", default=None)
    return parser


def fidelity_main(args: argparse.Namespace) -> int:
    from ..models import load_model

    prog = "flexwalk niah fidelity"
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    bad = [g for g in groups if g not in ABLATIONS]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad_tasks = [t for t in tasks if t not in TASKS]
    if bad or bad_tasks:
        print(f"{prog}: error: --groups {bad} / --tasks {bad_tasks} unknown; allowed groups {list(ABLATIONS)}, "
              f"tasks {list(TASKS)}", file=sys.stderr)
        return 2
    try:
        lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
        base = SketchWalkConfig.preset(args.preset, **(json.loads(args.config) if args.config else {}))
        # every configuration runs sparse at these lengths: the ablation is about the selection
        base = base.replace(dense_below=0)
    except (ValueError, TypeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    prompts = []
    for length in lengths:
        for task in tasks:
            path = dataset_path(args.data, length, task)
            if not path.is_file():
                print(f"{prog}: error: --data {str(args.data)!r}: missing {path}", file=sys.stderr)
                return 2
            prompts += [(task, length, r) for r in read_jsonl(path)[: args.limit]]
    model, tokenizer = load_model(args.model, attn_implementation="sdpa", device=args.device)
    configs = grid(base, groups)
    results: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "prompts": len(prompts), "tasks": tasks, "lengths": lengths,
            "base": base.to_dict(), "versions": {"torch": torch.__version__}}

    def write(complete: bool) -> None:
        # after every configuration: a run stopped early (a time limit) keeps what it measured
        done = {**meta, "complete": complete, "measured": len(results), "planned": len(prompts) * len(configs)}
        Path(f"{args.out}.json").write_text(json.dumps({"meta": done, "results": results}, indent=1))
        Path(f"{args.out}.md").write_text(markdown(results, done))

    t0 = time.perf_counter()
    for p_i, (task, length, rec) in enumerate(prompts):
        ids = torch.tensor([tokenizer(rec["input"] + rec.get("answer_prefix", "")).input_ids])
        inputs, logits = capture_attention_inputs(model, ids)  # logits of the last 64 positions, as next_token_kl
        for c_i, (group, change, cfg) in enumerate(configs):
            layers = layer_fidelity(model, inputs, cfg)
            sparse = [r for r in layers if r["sparse"]]
            kl = None if args.no_kl else next_token_kl(model, ids, cfg, dense_logits=logits)
            results.append({
                "task": task, "length": length, "index": rec["index"], "group": group, "change": change,
                "config": cfg.to_dict(), "kl": kl, "layers": layers,
                "rel_error": sum(r["rel_error"] for r in sparse) / max(1, len(sparse)),
                "recall": sum(r["recall"] for r in sparse) / max(1, len(sparse)),
                "density": sum(r["density"] for r in sparse) / max(1, len(sparse)),
            })
            print(f"[{p_i + 1}/{len(prompts)} {c_i + 1}/{len(configs)} {time.perf_counter() - t0:.0f}s] {task} {length} "
                  f"{group} {change}: err {results[-1]['rel_error']:.3f} recall {results[-1]['recall']:.3f} "
                  f"density {results[-1]['density']:.3f} kl {kl if kl is None else round(kl, 4)}",
                  file=sys.stderr, flush=True)
            write(complete=False)
        del inputs
    write(complete=True)
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One row per configuration: means over prompts of the sparse layers' means."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        rows.setdefault((r["group"], json.dumps(r["change"])), []).append(r)
    lines = [f"model {meta['model']}, {meta['prompts']} prompts ({', '.join(meta['tasks'])} at "
             f"{', '.join(map(str, meta['lengths']))} tokens); base: every other field as in the base config."
             + ("" if meta.get("complete", True) else
                f" **Incomplete:** {meta['measured']} of {meta['planned']} measurements (the run stopped early)."), "",
             "| group | change | density | attention output rel. error | dense-mass recall | next-token KL (nats) |",
             "|---|---|---|---|---|---|"]
    for (group, change), rs in rows.items():
        mean = lambda key: sum(x[key] for x in rs) / len(rs)  # noqa: E731
        kls = [x["kl"] for x in rs if x["kl"] is not None]
        kl = f"{sum(kls) / len(kls):.4f}" if kls else "-"
        lines.append(f"| {group} | {', '.join(f'{k}={v}' for k, v in json.loads(change).items())} | "
                     f"{mean('density'):.3f} | {mean('rel_error'):.3f} | {mean('recall'):.3f} | {kl} |")
    return "\n".join(lines) + "\n"
