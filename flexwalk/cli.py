"""Command line: `flexwalk demo` (also `python -m flexwalk demo`).

The demo is a short needle-in-a-haystack check on a real packaged model: a seeded haystack of
filler sentences with "The special magic number is NNNN." at several depths, then the
question.  Each prompt is answered greedily with dense attention (sdpa) and with
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

import torch

from .integrations.cache_kwarg import cache_kwargs, returned_cache

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


# ----------------------------------------------------------------------------- runs


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model, input_ids: list[int], max_new_tokens: int, eos_ids: set[int]):
    """Greedy decoding with a KV cache: (new token ids, prefill seconds, total seconds, all logits finite)."""
    device = model.device
    ids = torch.tensor([input_ids], device=device)
    _sync(device)
    t0 = time.perf_counter()
    # logits_to_keep=1: the full [T, vocab] logits would cost more memory than the model.
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
    _sync(device)
    prefill = time.perf_counter() - t0
    new, finite = [], True
    for _ in range(max_new_tokens):
        finite = finite and bool(torch.isfinite(logits).all())
        token = int(logits.argmax(-1))
        new.append(token)
        if token in eos_ids or len(new) == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[token]], device=device), **cache_kwargs(returned_cache(out)), use_cache=True)
        logits = out.logits[:, -1]
    _sync(device)
    return new, prefill, time.perf_counter() - t0, finite


@torch.no_grad()
def greedy_batch(model, batch_ids: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int):
    """`greedy` for several prompts at once: ([(new token ids, all logits finite)] per row,
    prefill seconds, total seconds) of the whole batch.

    Prompts of different lengths are padded on the left with `pad_id` and masked out
    (attention_mask 0); positions count real tokens only, as generate() computes them.  A batch
    without padding (one row, or rows of one length) passes no mask, exactly like `greedy`.  A
    row stops at (and includes) its first EOS; it is then fed `pad_id` until every row has
    stopped or max_new_tokens were generated.  The tokens stay on the device; the host reads
    one "all rows stopped" flag per step (on CUDA without stalling the queue: the flag of step
    t is read while step t+1 runs, which may cost one discarded step at the end).
    """
    if not batch_ids or any(len(r) == 0 for r in batch_ids):
        raise ValueError("greedy_batch: every row needs at least one prompt token")
    device = model.device
    rows, n = len(batch_ids), max(len(r) for r in batch_ids)
    ids = torch.full((rows, n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((rows, n + max_new_tokens), dtype=torch.long)
    for i, r in enumerate(batch_ids):
        ids[i, n - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, n - len(r):] = 1
    padded = any(len(r) != n for r in batch_ids)
    ids, mask = ids.to(device), mask.to(device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    pad = torch.full((rows,), int(pad_id), dtype=torch.long, device=device)
    tokens = torch.empty((rows, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    finite = torch.ones(rows, dtype=torch.bool, device=device)
    cuda = device.type == "cuda"
    if cuda:  # "all rows stopped" of each step, copied to the host without a sync
        flags = torch.zeros(max_new_tokens, dtype=torch.bool, pin_memory=True)
        event = torch.cuda.Event()
    kw: dict = {}
    if padded:
        # Left padding: positions from the mask, as generate() does (transformers 5 models take
        # position_ids as given, else count from the cache, which would count the padding).
        prompt_mask = mask[:, :n]
        kw = dict(attention_mask=prompt_mask,
                  position_ids=(prompt_mask.cumsum(-1) - 1).masked_fill_(prompt_mask == 0, 1))
        last_pos = prompt_mask.sum(-1, keepdim=True) - 1  # [rows, 1]: each row's last prompt position
    _sync(device)
    t0 = time.perf_counter()
    # logits_to_keep=1: the full [T, vocab] logits would cost more memory than the model.
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    logits = out.logits[:, -1]
    _sync(device)
    prefill = time.perf_counter() - t0
    steps = 0
    for step in range(max_new_tokens):
        finite &= done | torch.isfinite(logits).all(-1)
        token = torch.where(done, pad, logits.argmax(-1))
        tokens[:, step] = token
        done |= torch.isin(token, eos)
        steps = step + 1
        if steps == max_new_tokens:
            break
        if cuda:
            flags[step].copy_(done.all(), non_blocking=True)
            event.record()
        elif bool(done.all()):
            break
        if padded:
            kw = dict(attention_mask=mask[:, : n + steps], position_ids=last_pos + steps)
        out = model(input_ids=token[:, None], **cache_kwargs(returned_cache(out)), use_cache=True, **kw)
        if cuda:
            event.synchronize()  # waits for this step's flag, not for the forward just queued
            if bool(flags[step]):
                break
        logits = out.logits[:, -1]
    new = tokens[:, :steps].tolist()
    done_rows, finite_rows = done.tolist(), finite.tolist()
    _sync(device)
    total = time.perf_counter() - t0
    result = []
    for row, row_done, row_finite in zip(new, done_rows, finite_rows):
        if row_done:  # cut after the first EOS (later entries are padding)
            row = row[: next(i for i, t in enumerate(row) if t in eos_ids) + 1]
        result.append((row, bool(row_finite)))
    return result, prefill, total


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
    flat: set[int] = set()
    for i in ids:
        flat.update(i if isinstance(i, (list, tuple)) else [i])
    return {i for i in flat if i is not None}


def run_demo(model, tokenizer, lengths: Sequence[int], samples: int, config, seed: int = 0,
             max_new_tokens: int = 10, progress: bool = True) -> list[RunResult]:
    """Every prompt of every length, dense then sketchwalk_flex (configured with `config`)."""
    import flexwalk
    from tqdm.auto import tqdm

    eos = _eos_ids(model, tokenizer)
    num_layers = model.config.num_hidden_layers
    results: list[RunResult] = []
    bar = tqdm(total=len(lengths) * 2 * samples, desc="demo", disable=not progress, file=sys.stderr)
    for length in lengths:
        prompts = [needle_prompt(tokenizer, length, d, seed + i) for i, d in enumerate(sample_depths(samples))]
        for method in (DENSE, SPARSE):
            if method == SPARSE:
                flexwalk.configure(model, config)
            else:
                model.set_attn_implementation(DENSE)
            for p in prompts:
                bar.set_postfix_str(f"{length} tok, {method}")
                flexwalk.reset_counters()
                new, prefill, total, finite = greedy(model, p.input_ids, max_new_tokens, eos)
                text = tokenizer.decode(new, skip_special_tokens=True)
                counts = flexwalk.counters()
                report = flexwalk.density_report()
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


# ----------------------------------------------------------------------------- argparse


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated token counts like 1024,2048, got {text!r}") from None
    if not values or min(values) < 128:
        raise argparse.ArgumentTypeError(f"must be comma-separated token counts >= 128, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="flexwalk", description="SketchWalk block-sparse attention tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="needle-in-a-haystack check, dense vs sketchwalk_flex, on a packaged model",
        description="Needle-in-a-haystack prompts answered greedily with dense (sdpa) and sketchwalk_flex "
        "attention on one model; prints accuracy, achieved density and timings. Sparse attention runs "
        "for prompts of at least min(512, shortest length / 2) tokens.",
    )
    demo.add_argument("--model", default="smollm2-135m", help="packaged name or local model directory (default: %(default)s)")
    demo.add_argument("--lengths", type=_lengths, default=[1024, 2048], help="prompt lengths in tokens, comma-separated (default: 1024,2048)")
    demo.add_argument("--samples", type=_positive_int, default=3, help="prompts per length, needle depths spread over 0.1..0.9 (default: %(default)s)")
    demo.add_argument("--density", type=_density, default=0.2, help="fraction of causal key blocks kept, in (0, 1] (default: %(default)s)")
    demo.add_argument("--block-size", type=int, choices=(16, 32, 64, 128, 256), default=64, help="tokens per block (default: %(default)s)")
    demo.add_argument("--preset", choices=sorted(PRESETS), default="default", help="SketchWalk preset the flags above override (default: %(default)s)")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=10, help="greedy tokens per answer (default: %(default)s)")
    demo.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the haystacks and the sketches (default: %(default)s)")
    niah = sub.add_parser("niah", help="RULER needle-in-a-haystack accuracy harness: generate data, run, compare",
                          description="RULER-format NIAH tasks (docs/niah-data.md), evaluation of attention methods "
                          "(dense sdpa / flex, sketchwalk, one-hop, oracle top-k) and comparison reports "
                          "(docs/niah-report.md).")
    niah_sub = niah.add_subparsers(dest="niah_command", required=True)
    from .niah.data import add_generate_arguments
    from .niah.fidelity_cli import add_fidelity_arguments
    from .niah.report import add_compare_arguments
    from .niah.run import add_run_arguments

    add_generate_arguments(niah_sub.add_parser("generate", help="write RULER NIAH JSONL data for a model's tokenizer"))
    add_run_arguments(niah_sub.add_parser("run", help="evaluate methods on generated data (one result dir per method)"))
    add_compare_arguments(niah_sub.add_parser("compare", help="Markdown/JSON/PNG report across result directories"))
    add_fidelity_arguments(niah_sub.add_parser(
        "fidelity", help="answer-free fidelity of configurations vs dense: per-layer output error, mass recall, KL"))
    return parser


def demo_main(args: argparse.Namespace) -> int:
    import flexwalk
    from flexwalk.config import SketchWalkConfig
    from flexwalk.models import PACKAGED, is_cached, load_model

    # The default dense_below (2048) would keep the demo lengths dense: sparse must really run.
    dense_below = min(512, min(args.lengths) // 2)
    config = SketchWalkConfig.preset(
        args.preset, density=args.density, block_size=args.block_size, dense_below=dense_below, seed=args.seed
    )
    if args.model in PACKAGED and not is_cached(args.model):
        print(f"flexwalk: first use of {args.model}: converting its GGUF file once (~20-60 s)", file=sys.stderr)
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
            f"FAIL: sketchwalk_flex ran no sparse layer (counters: {flexwalk.counters()}); "
            "the sparse path did not run", file=sys.stderr,
        )
        return 1
    print(f"sparse path ran: {sparse_calls} sparse_prefill layer calls (flexwalk.counters())")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flexwalk` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "niah":
        from .niah import data, fidelity_cli, report, run

        handlers = {"generate": data.generate_main, "run": run.run_main, "compare": report.compare_main,
                    "fidelity": fidelity_cli.fidelity_main}
        return handlers[args.niah_command](args)
    return demo_main(args)
