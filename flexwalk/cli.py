"""Command line: `flexwalk demo` and `flexwalk niah ...` (also `python -m flexwalk ...`): the
parser and the dispatch to each command's module (flexwalk.demo, flexwalk.niah.cli)."""

from __future__ import annotations

import argparse
from typing import Sequence

from .argtypes import density, positive_int, token_lengths
from .config import PRESETS

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexwalk", description="SketchWalk block-sparse attention tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="needle-in-a-haystack check, dense vs sketchwalk_flex, on a packaged model",
        description="Needle-in-a-haystack prompts answered greedily with dense (sdpa) and sketchwalk_flex "
        "attention on one model; prints accuracy, achieved density and timings. Sparse attention runs "
        "for prompts of at least min(512, shortest length / 2) tokens.",
    )
    demo.add_argument("--model", default="smollm2-135m", help="packaged name or local model directory (default: %(default)s)")
    demo.add_argument("--lengths", type=token_lengths, default=[1024, 2048], help="prompt lengths in tokens, comma-separated (default: 1024,2048)")
    demo.add_argument("--samples", type=positive_int, default=3, help="prompts per length, needle depths spread over 0.1..0.9 (default: %(default)s)")
    demo.add_argument("--density", type=density, default=0.2, help="fraction of causal key blocks kept, in (0, 1] (default: %(default)s)")
    demo.add_argument("--block-size", type=int, choices=(16, 32, 64, 128, 256), default=64, help="tokens per block (default: %(default)s)")
    demo.add_argument("--preset", choices=sorted(PRESETS), default="default", help="SketchWalk preset the flags above override (default: %(default)s)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=10, help="greedy tokens per answer (default: %(default)s)")
    demo.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the haystacks and the sketches (default: %(default)s)")
    niah = sub.add_parser("niah", help="RULER needle-in-a-haystack accuracy harness: generate data, run, compare",
                          description="RULER-format NIAH tasks (docs/niah-data.md), evaluation of attention methods "
                          "(dense sdpa / flex, sketchwalk, one-hop, oracle top-k) and comparison reports "
                          "(docs/niah-report.md).")
    niah_sub = niah.add_subparsers(dest="niah_command", required=True)
    from .niah.cli import add_compare_arguments, add_fidelity_arguments, add_generate_arguments, add_run_arguments

    add_generate_arguments(niah_sub.add_parser("generate", help="write RULER NIAH JSONL data for a model's tokenizer"))
    add_run_arguments(niah_sub.add_parser("run", help="evaluate methods on generated data (one result dir per method)"))
    add_compare_arguments(niah_sub.add_parser("compare", help="Markdown/JSON/PNG report across result directories"))
    add_fidelity_arguments(niah_sub.add_parser(
        "fidelity", help="answer-free fidelity of configurations vs dense: per-layer output error, mass recall, KL"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flexwalk` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "niah":
        from .niah import cli as niah_cli

        handlers = {"generate": niah_cli.generate_main, "run": niah_cli.run_main, "compare": niah_cli.compare_main,
                    "fidelity": niah_cli.fidelity_main}
        return handlers[args.niah_command](args)
    from .demo import demo_main

    return demo_main(args)
