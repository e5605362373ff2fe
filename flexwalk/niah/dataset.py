"""RULER NIAH records in the model's tokens: each sample as long as fits its length exactly,
written in RULER's layout.

    from flexwalk.niah.dataset import generate_samples, generate_dataset
    samples = generate_samples(tokenizer, "niah_single_2", 4096, num_samples=10, seed=42)
    paths = generate_dataset(tokenizer, ["niah_single_1"], [4096, 8192], 10, "niah_data")

Each record's ``input + answer_prefix``, tokenized exactly as ``tokenizer(text).input_ids``, is
the longest that fits ``length - tokens_to_generate`` (search over the haystack size in words);
the needle holding the first expected answer sits at the requested depth.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .haystack import Prompt, Rendered, essay_fingerprint, haystack_stream, random_needle, render
from .tasks import (
    ANSWER_PREFIX,
    CHAT_TEMPLATE,
    DEFAULT_SEED,
    MODEL_TEMPLATES,
    NEEDLE,
    RULER_DEPTHS,
    SUBSET,
    TASK_TEMPLATE,
    TOKENS_TO_GENERATE,
    NiahTask,
    get_task,
)

def model_wrapper(template: str, tokenizer: Any) -> str:
    """A model template holding "{task_template}": a RULER name, "chat" or a custom string."""
    if template == CHAT_TEMPLATE:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("template='chat' needs a tokenizer with a chat template; this one has none (use 'base')")
        marker = "\x00TASK\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and _adds_bos(tokenizer):
            text = text[len(bos):]  # tokenizer(text) adds BOS itself; keep one
        return text.replace(marker, "{task_template}")
    if template in MODEL_TEMPLATES:
        return MODEL_TEMPLATES[template]
    if template.count("{task_template}") == 1:
        return template
    raise ValueError(
        f"template={template!r} is invalid: use one of {', '.join([*MODEL_TEMPLATES, CHAT_TEMPLATE])} "
        "or a string containing '{task_template}' once"
    )


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and list(tokenizer("a").input_ids[:1]) == [bos]


_CONTEXT = "\x00CONTEXT\x00"


def _prompt(task: NiahTask, wrapper: str, query: str) -> Prompt:
    """RULER's template for this task; singular wording when one answer is expected (as RULER)."""
    template, prefix, kind = TASK_TEMPLATE, ANSWER_PREFIX, task.type_needle_v
    if task.num_needle_q * task.num_needle_v == 1:
        # RULER applies these replacements to the template (answer prefix included).
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        kind = kind[:-1]
    body = template.format(type_needle_v=kind, context=_CONTEXT, query=query)
    head, tail = wrapper.replace("{task_template}", body).split(_CONTEXT)
    return Prompt(head, tail, prefix.format(type_needle_v=kind, query=query))


@dataclass(frozen=True)
class _Needles:
    """The random content of one sample (all drawn from its own seeded generator)."""

    keys: list[str]
    values: list[list[str]]
    queries: list[int]
    answers: list[str]
    needles: list[tuple[str, float]]
    """(sentence, target depth); the first is the needle of answers[0]."""
    value_offset: int
    """Offset of answers[0] inside the first needle's sentence."""


def _draw_needles(task: NiahTask, rng: random.Random, depth: float) -> _Needles:
    keys: list[str] = []
    while len(keys) < task.num_keys:
        key = random_needle(rng, task.type_needle_k)
        if key not in keys:
            keys.append(key)
    seen: set[str] = set(keys)
    values: list[list[str]] = []
    for _ in keys:
        row: list[str] = []
        while len(row) < task.num_needle_v:
            value = random_needle(rng, task.type_needle_v)
            if value not in seen:
                seen.add(value)
                row.append(value)
        values.append(row)
    queries = rng.sample(range(task.num_keys), task.num_needle_q)
    answers = [v for q in queries for v in values[q]]
    others = [(k, j) for k in range(task.num_keys) for j in range(task.num_needle_v) if (k, j) != (queries[0], 0)]
    pool = RULER_DEPTHS
    other_depths = rng.sample(pool, len(others)) if len(others) <= len(pool) else rng.choices(pool, k=len(others))

    def sentence(k: int, j: int) -> str:
        return NEEDLE.format(type_needle_v=task.type_needle_v, key=keys[k], value=values[k][j])

    first = sentence(queries[0], 0)
    needles = [(first, depth)] + [(sentence(k, j), d) for (k, j), d in zip(others, other_depths)]
    return _Needles(keys, values, queries, answers, needles, first.rindex(answers[0]))


class _TooShort(ValueError):
    def __init__(self, tokens: int):
        super().__init__(tokens)
        self.tokens = tokens


def _largest_fitting(count: Callable[[int], int], budget: int, guess: int) -> tuple[int, int]:
    """(n, count(n)) for the largest n found with count(n) <= budget and count(n + 1) > budget.

    count is non-decreasing in practice (haystack words -> tokens); probes extrapolate from
    the tokens per word seen so far, then alternate interpolation and bisection in the bracket.
    """
    lo, c_lo = 0, count(0)
    if c_lo > budget:
        raise _TooShort(c_lo)
    hi, c_hi = None, 0
    n, step = max(1, guess), 0
    while True:
        c = count(n)
        if c <= budget:
            lo, c_lo = n, c
        else:
            hi, c_hi = n, c
        if hi is not None and hi - lo <= 1:
            return lo, c_lo
        step += 1
        if hi is None:
            rate = (c_lo - count(0)) / lo if lo else 0.0  # tokens per word
            n = lo + (int((budget - c_lo) / rate) + 2 if rate > 0 else max(lo, 16))
        elif step % 2:
            n = lo + int((budget - c_lo) * (hi - lo) / max(c_hi - c_lo, 1))
        else:
            n = (lo + hi) // 2
        n = min(max(n, lo + 1), hi - 1) if hi is not None else max(n, lo + 1)


def _largest_fitting_below(count: Callable[[int], int], budget: int, stop: int) -> tuple[int, int]:
    """(c, count(c)): bisection for the largest c in [0, stop) with count(c) <= budget (count(0) fits)."""
    lo, hi = 0, stop
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, count(lo)


def _token_positions(tokenizer: Any, text: str, chars: Sequence[int]) -> list[int]:
    """Index in tokenizer(text).input_ids of the token holding each character offset."""
    try:
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers have no offsets
        return [len(tokenizer(text[:c]).input_ids) for c in chars]
    ends = [end for _, end in offsets]
    # tokens wholly before c (special tokens map to (0, 0)); a token that starts before c and
    # ends after it holds c, e.g. " One" holding the "O" of a needle.
    return [bisect.bisect_right(ends, c) for c in chars]


def default_depths(num_samples: int) -> list[float]:
    """Evenly spaced depths over [0, 1]: min(num_samples, 40) points (RULER's 40-point grid), 0.5 for one."""
    n = min(max(num_samples, 1), len(RULER_DEPTHS))
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r} is invalid: must be an int >= {lo}")
    return value


def _check_depths(depths: Sequence[float] | None, num_samples: int) -> list[float]:
    if depths is None:
        return default_depths(num_samples)
    values = list(depths)
    if not values:
        raise ValueError("depths=[] is invalid: give at least one depth in [0, 1] (or None for the default)")
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"depths: {d!r} is invalid: each depth must be a fraction in [0, 1]")
    return [float(d) for d in values]


def generate_samples(
    tokenizer: Any,
    task: str | NiahTask,
    length: int,
    num_samples: int,
    seed: int = DEFAULT_SEED,
    depths: Sequence[float] | None = None,
    tokens_to_generate: int = TOKENS_TO_GENERATE,
    template: str = "base",
    on_sample: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """`num_samples` RULER records of `task`, each as long as fits `length` in this tokenizer's tokens.

    Sample i puts the needle of its first answer at depth ``depths[i % len(depths)]`` (default:
    default_depths(num_samples)); its other needles go at random RULER depths.  Each record's
    ``input + answer_prefix`` takes ``input_length <= length - tokens_to_generate`` tokens,
    counted as ``len(tokenizer(text).input_ids)``, usually within a few tokens of the bound (it
    grows by whole haystack words); ``length`` is ``input_length + tokens_to_generate`` as in
    RULER.  Same arguments and tokenizer give identical records.  `on_sample` is called with
    each record as it is made (progress bars).
    """
    spec = get_task(task)
    _check_int("length", length, 1)
    _check_int("num_samples", num_samples, 0)
    _check_int("tokens_to_generate", tokens_to_generate, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is invalid: must be an int")
    depth_list = _check_depths(depths, num_samples)
    wrapper = model_wrapper(template, tokenizer)
    budget = length - tokens_to_generate
    source = essay_fingerprint() if spec.haystack == "essay" else {"noise": "ruler-noise", "needle": "distractors"}[spec.haystack]

    records: list[dict[str, Any]] = []
    guess = max(1, budget // 2)
    for index in range(num_samples):
        depth = depth_list[index % len(depth_list)]
        rng = random.Random(f"flexwalk.niah/{seed}/{spec.name}/{index}")
        drawn = _draw_needles(spec, rng, depth)
        queries = [drawn.keys[q] for q in drawn.queries]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        prompt = _prompt(spec, wrapper, query)
        stream = haystack_stream(spec, random.Random(f"flexwalk.niah/{seed}/{spec.name}/{index}/haystack"),
                                  set(drawn.keys))

        @functools.lru_cache(maxsize=None)
        def count(words: int, chars: int = 0) -> int:
            return len(tokenizer(render(prompt, stream, drawn.needles, words, chars).text).input_ids)

        try:
            words, input_length = _largest_fitting(count, budget, guess)
        except _TooShort as exc:
            raise ValueError(
                f"length={length} is too small for {spec.name} with tokens_to_generate={tokens_to_generate} "
                f"and template {template!r}: the prompt without haystack takes {exc.tokens} tokens "
                f"(sample {index}), so length must be at least {exc.tokens + tokens_to_generate} "
                f"(a little more for other samples' needles)"
            ) from None
        guess = max(1, words)
        chars = 0
        if spec.haystack == "needle" and input_length < budget:
            # A distractor word can be ~36 tokens (a UUID): fill the gap with the next word's
            # first characters.  Only distractors are ever cut; real needles go in whole.
            next_word = stream.prefix(words + 1)[-1].rsplit(" ", 1)[-1]
            chars, input_length = _largest_fitting_below(lambda c: count(words, c), budget, len(next_word))
        rendered = render(prompt, stream, drawn.needles, words, chars)
        record = _record(tokenizer, spec, rendered, drawn, prompt, index=index, length=length, seed=seed,
                         depth=depth, input_length=input_length, tokens_to_generate=tokens_to_generate,
                         template=template, source=source)
        records.append(record)
        if on_sample is not None:
            on_sample(record)
    return records


def _record(tokenizer: Any, spec: NiahTask, rendered: Rendered, drawn: _Needles, prompt: Prompt, *,
            index: int, length: int, seed: int, depth: float, input_length: int, tokens_to_generate: int,
            template: str, source: str) -> dict[str, Any]:
    """RULER's fields, then ours; token positions measured in the final text."""
    text = rendered.text
    split = len(text) - len(prompt.answer_prefix)
    ctx_start, ctx_end = rendered.context
    answer_char = rendered.needle_spans[0][0] + drawn.value_offset
    edges = [ctx_start, ctx_end, answer_char] + [c for span in rendered.needle_spans for c in span]
    pos = _token_positions(tokenizer, text, edges)
    needle_tokens = [pos[3 + 2 * i + 1] - pos[3 + 2 * i] for i in range(len(rendered.needle_spans))]
    haystack_tokens = pos[1] - pos[0] - sum(needle_tokens)
    first = rendered.needle_spans[0][0]
    before = pos[3] - pos[0] - sum(t for (s, _), t in zip(rendered.needle_spans, needle_tokens) if s < first)
    return {
        "index": index,
        "input": text[:split],
        "outputs": drawn.answers,
        "length": input_length + tokens_to_generate,
        "length_w_model_temp": input_length + tokens_to_generate,
        "answer_prefix": text[split:],
        "token_position_answer": pos[2],
        "task": spec.name,
        "max_seq_length": length,
        "tokens_to_generate": tokens_to_generate,
        "input_length": input_length,
        "seed": seed,
        "depth": depth,
        "depth_actual": round(before / haystack_tokens, 4) if haystack_tokens > 0 else 0.0,
        "haystack": spec.haystack,
        "haystack_source": source,
        "type_needle_k": spec.type_needle_k,
        "type_needle_v": spec.type_needle_v,
        "num_needle_k": spec.num_needle_k,
        "num_needle_v": spec.num_needle_v,
        "num_needle_q": spec.num_needle_q,
        "template": template,
    }


def dataset_path(out_dir: str | os.PathLike, length: int, task: str) -> Path:
    """RULER's layout: ``{out_dir}/{length}/data/{task}/validation.jsonl``."""
    return Path(out_dir) / str(length) / "data" / task / f"{SUBSET}.jsonl"


def write_jsonl(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line (UTF-8, keys in record order); written to a temp file, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate_dataset(
    tokenizer: Any,
    tasks: Sequence[str | NiahTask],
    lengths: Sequence[int],
    num_samples: int,
    out_dir: str | os.PathLike,
    seed: int = DEFAULT_SEED,
    depths: Sequence[float] | None = None,
    tokens_to_generate: int = TOKENS_TO_GENERATE,
    template: str = "base",
    progress: bool = False,
) -> list[Path]:
    """generate_samples for every (length, task), written in RULER's layout; the paths in that order.

    Every argument is checked before anything is generated; progress=True shows a tqdm bar
    (stderr) over all samples.
    """
    specs = [get_task(t) for t in tasks]
    for length in lengths:
        _check_int("length", length, 1)
    _check_int("num_samples", num_samples, 0)
    _check_depths(depths, num_samples)
    model_wrapper(template, tokenizer)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs) * len(lengths) * num_samples, desc="niah", unit="sample", file=sys.stderr)
    paths: list[Path] = []
    try:
        for length in lengths:
            for spec in specs:
                if bar is not None:
                    bar.set_postfix_str(f"{spec.name} @ {length}")
                samples = generate_samples(tokenizer, spec, length, num_samples, seed=seed, depths=depths,
                                           tokens_to_generate=tokens_to_generate, template=template,
                                           on_sample=(lambda _: bar.update()) if bar is not None else None)
                paths.append(write_jsonl(dataset_path(out_dir, length, spec.name), samples))
    finally:
        if bar is not None:
            bar.close()
    return paths


def parse_length(text: str) -> int:
    """'4096', '4k' (4096), '128K' (131072) or '1m' -> tokens; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a token count: use e.g. 4096 or 4k (k = 1024)")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"{text!r} is not a positive token count")
    return value
