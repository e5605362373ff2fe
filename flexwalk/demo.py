"""`flexwalk demo` (also `python -m flexwalk demo`): a short needle-in-a-haystack check on a real
packaged model.

A seeded haystack of filler sentences with "The special magic number is NNNN." at several
depths, then the question.  Each prompt is answered greedily with dense attention (sdpa) and with
sketchwalk_flex on the same model object; the table reports accuracy, achieved density and
timings, and the command fails (exit 1) if sketchwalk_flex never ran a sparse layer.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from . import stats
from .config import SketchWalkConfig
from .generation import eos_ids, greedy
from .integrations.transformers import configure

QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
INTRO = "Below is a long text. Somewhere in it is a special magic number; remember it.\n\n"
ANSWER_PREFIX = "The special magic number is"
DENSE, SPARSE = "sdpa", "sketchwalk_flex"


_SUBJECTS = (
    "the old farmer", "a young painter", "the quiet librarian", "my neighbor", "the tall engineer",
    "a curious child", "the baker", "the ship captain", "an elderly teacher", "the gardener",
    "a tired nurse", "the mail carrier", "a street musician", "the museum guard", "a shy student",
)
_VERBS = (
    "walked to", "painted", "visited", "cleaned", "repaired", "described", "photographed",
    "waited near", "talked about", "sketched", "forgot about", "admired", "searched for", "passed",
)
_OBJECTS = (
    "the river bridge", "a red bicycle", "the village market", "an empty train station", "the stone wall",
    "a small wooden boat", "the public garden", "an old lighthouse", "the crowded harbor", "a blue door",
    "the hill behind the church", "a quiet bookshop", "the frozen pond", "the apple orchard",
)
_TIMES = (
    "in the morning", "after lunch", "on a rainy afternoon", "before sunset", "during the winter",
    "last weekend", "late at night", "at the end of summer", "on a windy day", "early in spring",
)
_WEATHER = ("calm", "cold", "warm", "grey", "bright", "foggy", "mild", "stormy")


def filler_sentences(rng: random.Random):
    """Endless varied simple sentences without digits (so the needle is the only number)."""
    while True:
        s, v, o, t = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TIMES)
        form = rng.randrange(3)
        if form == 0:
            yield f"{s.capitalize()} {v} {o} {t}."
        elif form == 1:
            yield f"{t.capitalize()}, {s} {v} {o}."
        else:
            yield f"{s.capitalize()} {v} {o}, and the weather was {rng.choice(_WEATHER)}."


def build_haystack(n_tokens: int, depth: float, needle: str, count_tokens: Callable[[str], int], seed: int) -> str:
    """Filler text of about `n_tokens` tokens with `needle` inserted at `depth` in [0, 1].

    The needle goes in at the sentence boundary whose share of preceding filler tokens is
    closest to `depth`.  Deterministic given the seed (and the token counter).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")
    rng = random.Random(seed)
    budget = max(0, n_tokens - count_tokens(" " + needle))
    sentences, counts = [], []
    for sentence in filler_sentences(rng):
        if sum(counts) >= budget:
            break
        sentences.append(sentence)
        counts.append(count_tokens(" " + sentence))
    total, target, cum, best = sum(counts), depth * sum(counts), 0, (float("inf"), 0)
    for k in range(len(counts) + 1):
        best = min(best, (abs(cum - target), k))
        if k < len(counts):
            cum += counts[k]
    k = best[1]
    return " ".join(sentences[:k] + [needle] + sentences[k:]) if total else needle


@dataclass(frozen=True)
class NeedleSample:
    """One demo prompt: input_ids [T] (T close to the requested length) and the expected answer."""

    input_ids: list[int]
    answer: str
    depth: float
    haystack: str


def needle_prompt(tokenizer, length: int, depth: float, seed: int) -> NeedleSample:
    """A needle-in-a-haystack prompt of about `length` tokens, needle at `depth` of the haystack.

    Uses the tokenizer's chat template when it has one (instruct models), then starts the
    answer with ANSWER_PREFIX so a greedy continuation is the number.
    """
    answer = str(random.Random(seed).randint(1000, 9999))
    needle = f"The special magic number is {answer}."
    chat = getattr(tokenizer, "chat_template", None) is not None

    def render(haystack: str) -> list[int]:
        content = f"{INTRO}{haystack}\n\n{QUESTION}"
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            return tokenizer(text + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        return tokenizer(f"{content}\nAnswer: {ANSWER_PREFIX}", add_special_tokens=True)["input_ids"]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    haystack = build_haystack(length - len(render("")), depth, needle, count, seed)
    return NeedleSample(render(haystack), answer, depth, haystack)


def sample_depths(n: int) -> list[float]:
    """n depths spread over [0.1, 0.9] (one sample: the middle)."""
    return [0.5] if n == 1 else [0.1 + 0.8 * i / (n - 1) for i in range(n)]


@dataclass
class RunResult:
    """One (prompt, method) run.  Times in seconds; density over the sparse layers of this prefill."""

    length: int
    method: str
    tokens: int
    answer: str
    output_ids: list[int]
    output: str
    correct: bool
    finite: bool
    prefill_s: float
    total_s: float
    density: float | None
    sparse_calls: int
    prefill_calls: int


def run_demo(model, tokenizer, lengths: Sequence[int], samples: int, config, seed: int = 0,
             max_new_tokens: int = 10, progress: bool = True) -> list[RunResult]:
    """Every prompt of every length, dense then sketchwalk_flex (configured with `config`)."""
    from tqdm.auto import tqdm

    eos = eos_ids(model, tokenizer)
    num_layers = model.config.num_hidden_layers
    results: list[RunResult] = []
    bar = tqdm(total=len(lengths) * 2 * samples, desc="demo", disable=not progress, file=sys.stderr)
    for length in lengths:
        prompts = [needle_prompt(tokenizer, length, d, seed + i) for i, d in enumerate(sample_depths(samples))]
        for method in (DENSE, SPARSE):
            if method == SPARSE:
                configure(model, config)
            else:
                model.set_attn_implementation(DENSE)
            for p in prompts:
                bar.set_postfix_str(f"{length} tok, {method}")
                stats.reset_counters()
                new, prefill, total, finite = greedy(model, p.input_ids, max_new_tokens, eos)
                text = tokenizer.decode(new, skip_special_tokens=True)
                counts = stats.counters()
                report = stats.density_report()
                results.append(RunResult(
                    length=length, method=method, tokens=len(p.input_ids), answer=p.answer, output_ids=new,
                    output=text, correct=p.answer in text, finite=finite, prefill_s=prefill, total_s=total,
                    density=sum(report.values()) / len(report) if report else None,
                    sparse_calls=counts.get("sparse_prefill", 0),
                    # sdpa runs record nothing: every layer of the prefill ran dense.
                    prefill_calls=sum(v for k, v in counts.items() if k != "dense_decode") or num_layers,
                ))
                bar.update()
    bar.close()
    model.set_attn_implementation(DENSE)
    return results


def format_table(results: Sequence[RunResult]) -> str:
    """One row per (length, method): accuracy, mean achieved density, sparse layer calls, median times."""
    header = ("length", "tokens", "method", "accuracy", "density", "sparse layers", "prefill s", "total s")
    rows = [header]
    keys = list(dict.fromkeys((r.length, r.method) for r in results))
    for length, method in keys:
        rs = [r for r in results if (r.length, r.method) == (length, method)]
        dens = [r.density for r in rs if r.density is not None]
        rows.append((
            str(length),
            str(round(statistics.mean(r.tokens for r in rs))),
            method,
            f"{sum(r.correct for r in rs)}/{len(rs)}",
            f"{statistics.mean(dens):.3f}" if dens else "1 (dense)",
            f"{sum(r.sparse_calls for r in rs)}/{sum(r.prefill_calls for r in rs)}",
            f"{statistics.median(r.prefill_s for r in rs):.2f}",
            f"{statistics.median(r.total_s for r in rs):.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def demo_main(args: argparse.Namespace) -> int:
    """Run `flexwalk demo` (arguments: cli.build_parser); the exit code."""
    from .models import first_use_notice, load_model

    # The default dense_below (2048) would keep the demo lengths dense: sparse must really run.
    dense_below = min(512, min(args.lengths) // 2)
    config = SketchWalkConfig.preset(
        args.preset, density=args.density, block_size=args.block_size, dense_below=dense_below, seed=args.seed
    )
    notice = first_use_notice(args.model)
    if notice:
        print(f"flexwalk: {notice}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_model(args.model, attn_implementation=DENSE, sketchwalk=config, device=args.device)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # unknown name, missing path or package
        print(f"flexwalk demo: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"model {args.model}: {model.config.num_hidden_layers} layers, {model.device}, {model.dtype}, "
        f"loaded in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    print(f"sketchwalk config: {config}", file=sys.stderr)
    results = run_demo(model, tokenizer, args.lengths, args.samples, config, args.seed, args.max_new_tokens)
    print(format_table(results))
    sparse_calls = sum(r.sparse_calls for r in results if r.method == SPARSE)
    if sparse_calls == 0:
        print(
            f"FAIL: sketchwalk_flex ran no sparse layer (counters: {stats.counters()}); "
            "the sparse path did not run", file=sys.stderr,
        )
        return 1
    print(f"sparse path ran: {sparse_calls} sparse_prefill layer calls (stats.counters())")
    return 0
