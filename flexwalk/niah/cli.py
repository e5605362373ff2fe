"""`flexwalk niah generate | run | compare | fidelity`: each command's arguments and main function,
over niah.dataset, niah.run, niah.report and niah.fidelity."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..argtypes import comma_choices, positive_int
from ..config import PRESETS, SketchWalkConfig
from ..models import PACKAGED
from .dataset import dataset_path, generate_dataset, parse_length, read_jsonl
from .fidelity import ABLATIONS, grid, run_ablation
from .report.compare import compare
from .report.markdown import accuracy_text
from .report.summary import DEFAULT_MIN_SAMPLES
from .run import DENSE_METHODS, METHODS, load_samples, method_config, run_method
from .tasks import CHAT_TEMPLATE, DEFAULT_SEED, MODEL_TEMPLATES, TASKS, TOKENS_TO_GENERATE

def _tasks_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown task {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"use 'all' or a comma list of: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _lengths_arg(text: str) -> list[int]:
    try:
        values = [parse_length(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; give comma-separated token counts like 4k,8k or 4096") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated token counts like 4k,8k or 4096")
    return list(dict.fromkeys(values))


def _depths_arg(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated fractions in [0, 1] like 0,0.25,0.5,1")
    return values


def _int_arg(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo:
            raise argparse.ArgumentTypeError(f"{text!r}: must be an int >= {lo}")
        return value

    return parse


def _template_arg(text: str) -> str:
    if text in MODEL_TEMPLATES or text == CHAT_TEMPLATE or text.count("{task_template}") == 1:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: use one of {', '.join([*MODEL_TEMPLATES, CHAT_TEMPLATE])} or a string containing '{{task_template}}'")


def _labels(text: str) -> list[str]:
    return [v.strip() for v in text.split(",")]


# ----------------------------------------------------------------------------- generate


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `flexwalk niah generate` (see generate_main)."""
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"packaged model name ({', '.join(PACKAGED)}) or a local model/tokenizer directory; "
                        "only its tokenizer is loaded (default: %(default)s)")
    parser.add_argument("--tasks", type=_tasks_arg, default=list(TASKS),
                        help=f"comma-separated tasks or 'all' (default: all): {', '.join(TASKS)}")
    parser.add_argument("--lengths", type=_lengths_arg, default=[4096],
                        help="total lengths in tokens (prompt + tokens to generate), comma-separated; 4k = 4096 "
                        "(default: 4k)")
    parser.add_argument("--samples", type=_int_arg(1), default=50, help="samples per task and length (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s, as RULER)")
    parser.add_argument("--depths", type=_depths_arg, default=None,
                        help="comma-separated needle depths in [0, 1], cycled over samples "
                        "(default: min(samples, 40) evenly spaced over [0, 1])")
    parser.add_argument("--tokens-to-generate", type=_int_arg(0), default=TOKENS_TO_GENERATE,
                        help="tokens reserved for the answer, excluded from the prompt (default: %(default)s, as RULER)")
    parser.add_argument("--template", type=_template_arg, default="base",
                        help="model template: base (plain text, RULER's default), chat (the tokenizer's chat "
                        "template), a RULER template name, or a string containing {task_template} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("niah_data"),
                        help="output root; files go to OUT/LENGTH/data/TASK/validation.jsonl (default: %(default)s)")
    return parser


def load_tokenizer(model: str) -> Any:
    """The tokenizer of a packaged model name (converted once by flexwalk.models) or a local directory."""
    from transformers import AutoTokenizer

    from ..models import resolve_model

    path = Path(model).expanduser()
    return AutoTokenizer.from_pretrained(path if path.is_dir() else resolve_model(model))


def generate_main(args: argparse.Namespace) -> int:
    """Run `flexwalk niah generate`: 0 on success, 2 on a bad model or argument (message on stderr)."""
    from ..models import first_use_notice

    prog = "flexwalk niah generate"
    notice = first_use_notice(args.model)
    if notice:
        print(f"{prog}: {notice}", file=sys.stderr)
    try:
        tokenizer = load_tokenizer(args.model)
    except (ValueError, FileNotFoundError, ImportError, OSError) as exc:
        print(f"{prog}: error: --model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    try:
        paths = generate_dataset(tokenizer, args.tasks, args.lengths, args.samples, args.out, seed=args.seed,
                                 depths=args.depths, tokens_to_generate=args.tokens_to_generate,
                                 template=args.template, progress=True)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print(f"{prog}: wrote {len(paths)} files, {len(paths) * args.samples} samples under {args.out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- run


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `flexwalk niah run` (see run_main)."""
    parser.add_argument("--model", default="smollm2-135m", help="packaged name or local model directory (default: %(default)s)")
    parser.add_argument("--data", type=Path, required=True, help="root written by `flexwalk niah generate`")
    parser.add_argument("--out", type=Path, required=True, help="results root; one directory per method")
    parser.add_argument("--methods", type=comma_choices(METHODS, "--methods"), default=list(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--tasks", type=_tasks_arg, default=list(TASKS), help="comma-separated tasks or 'all'")
    parser.add_argument("--lengths", type=_lengths_arg, default=[4096], help="lengths to evaluate (default: 4k)")
    parser.add_argument("--limit", type=positive_int, default=None, help="at most this many samples per task and length")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="SketchWalk preset (default: %(default)s)")
    parser.add_argument("--config", default=None,
                        help="SketchWalk fields overriding the preset, as JSON, e.g. '{\"density\": 0.1, \"block_size\": 128}'")
    parser.add_argument("--sparse-decode", action="store_true", help="sketchwalk, one_hop and walk decode sparsely too")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="greedy tokens per answer (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="samples decoded together, left-padded (default: %(default)s); per-sample times are then "
                        "batch means and density/counters the batch's")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    return parser


def run_main(args: argparse.Namespace) -> int:
    """Run `flexwalk niah run`: 0 on success, 2 on a bad model, argument or data path."""
    from ..models import load_model

    prog = "flexwalk niah run"
    try:
        overrides = json.loads(args.config) if args.config else {}
        if not isinstance(overrides, dict):
            raise ValueError("must be a JSON object")
        base = SketchWalkConfig.preset(args.preset, **overrides)
    except (ValueError, TypeError) as exc:
        print(f"{prog}: error: --config {args.config!r}: {exc}", file=sys.stderr)
        return 2
    try:
        samples = load_samples(args.data, args.tasks, args.lengths, args.limit)
    except FileNotFoundError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_model(args.model, attn_implementation="sdpa", device=args.device, dtype=args.dtype)
    except (ValueError, FileNotFoundError, ImportError, OSError) as exc:
        print(f"{prog}: error: --model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    for method in args.methods:
        cfg = method_config(method, base, args.sparse_decode)
        t0 = time.perf_counter()
        try:
            run_dir = run_method(model, tokenizer, method, cfg, samples, args.out, model_name=args.model, data=args.data,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        except ValueError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        s = json.loads((run_dir / "summary.json").read_text())["overall"]
        if method not in DENSE_METHODS and s["density"] is None:
            print(f"{prog}: warning: {method} ran no sparse layer: every prompt is shorter than dense_below "
                  f"({cfg.dense_below!r}: {cfg.min_sparse_length(model.device)} tokens on {model.device.type}), "
                  "so these are dense results; lower it with --config '{\"dense_below\": N}'", file=sys.stderr)
        dens = "" if s["density"] is None else f", density {s['density']:.3f}"
        print(f"{method}: {s['n']} samples, string_match_all {s['string_match_all']:.1f}{dens} "
              f"({time.perf_counter() - t0:.0f} s) -> {run_dir}")
    return 0


# ----------------------------------------------------------------------------- compare


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `flexwalk niah compare` (run it with compare_main)."""
    parser.add_argument("paths", nargs="+", type=Path, metavar="RESULT",
                        help="flexwalk run directories (run.json + samples.jsonl, plain or .gz) or RULER prediction roots")
    parser.add_argument("--out", type=Path, default=Path("niah-report"),
                        help="directory for report.md, report.json and the plots (default: %(default)s)")
    parser.add_argument("--labels", type=_labels, default=None,
                        help="comma-separated method label per result, 'label' or 'label@model' (empty keeps the "
                        "run's method, or the RULER model directory name)")
    parser.add_argument("--baseline", default=None,
                        help="method label deltas are taken to (default: sdpa if present, else the first dense run)")
    parser.add_argument("--min-samples", type=positive_int, default=DEFAULT_MIN_SAMPLES,
                        help="cells with fewer samples are flagged under-powered (default: %(default)s)")
    return parser


def compare_main(args: argparse.Namespace) -> int:
    """Run `flexwalk niah compare`; 0 on success, 2 on a bad argument or result path."""
    if args.labels is not None and len(args.labels) != len(args.paths):
        print(f"flexwalk niah compare: error: --labels={','.join(args.labels)!r} has {len(args.labels)} entries "
              f"for {len(args.paths)} result paths: must be one per path (an empty entry keeps the default)",
              file=sys.stderr)
        return 2
    try:
        report = compare(args.paths, args.out, args.labels, args.baseline, args.min_samples)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"flexwalk niah compare: error: {exc}", file=sys.stderr)
        return 2
    for model, mr in report["models"].items():
        print(f"{model}: accuracy by method (mean over tasks and lengths)")
        for m in mr["methods"]:
            print(f"  {m:>20}  {accuracy_text(mr['accuracy_by_method_length'][m]['avg'])}")
    print(f"wrote {Path(args.out) / 'report.md'}, report.json and {len(report['plots'])} plots")
    return 0


# ----------------------------------------------------------------------------- fidelity


def add_fidelity_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `flexwalk niah fidelity` (see fidelity_main)."""
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


def fidelity_main(args: argparse.Namespace, *, layer_fn=None) -> int:
    """Run `flexwalk niah fidelity`: 0 on success, 2 on a bad argument.  layer_fn: the per-layer
    measure (fidelity.run_ablation; default layer_fidelity)."""
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
    meta = {"model": args.model, "prompts": len(prompts), "tasks": tasks, "lengths": lengths,
            "base": base.to_dict(), "versions": {"torch": torch.__version__}}
    run_ablation(model, tokenizer, prompts, grid(base, groups), args.out, meta, kl=not args.no_kl, layer_fn=layer_fn)
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0
