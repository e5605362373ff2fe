"""RULER needle-in-a-haystack data: the eight NIAH tasks, exact lengths in the model's tokens.

    from flexwalk.niah.data import TASKS, generate_samples, generate_dataset
    samples = generate_samples(tokenizer, "niah_single_2", 4096, num_samples=10, seed=42)
    paths = generate_dataset(tokenizer, ["niah_single_1"], [4096, 8192], 10, "niah_data")

The tasks, needle sentence, prompt template, answer prefix and noise haystack are RULER's
(NVIDIA/RULER ``scripts/synthetic.yaml``, ``scripts/data/synthetic/niah.py`` and
``constants.py``).  What differs, because nothing may be downloaded: the "essay" haystack is
prose from Python's own documentation (``pydoc_data.topics``) instead of Paul Graham essays,
and key/value words are adjective-noun pairs from word lists in this module instead of the
wonderwords package.  Each record's ``input + answer_prefix``, tokenized exactly as
``tokenizer(text).input_ids``, is the longest that fits ``length - tokens_to_generate``
(search over the haystack size in words); the needle holding the first expected answer sits
at the requested depth.  See docs/niah-data.md.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import json
import os
import random
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

# ----------------------------------------------------------------------------- RULER constants

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
"""RULER's needle sentence (niah.py); {type_needle_v} is always plural here, as in RULER."""
TASK_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
"""RULER's niah template (constants.py TASKS['niah']['template'])."""
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
"""RULER's niah answer prefix; the model continues after it."""
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's "noise" haystack unit, repeated one per line."""
TOKENS_TO_GENERATE = 128
"""RULER's tokens_to_generate for niah."""
DEFAULT_SEED = 42
"""RULER's default random_seed."""
RULER_DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))
"""RULER's DEPTHS, np.round(np.linspace(0, 100, 40)) as fractions: where extra needles may go."""

MODEL_TEMPLATES: dict[str, str] = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "vicuna-chat": "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: {task_template} ASSISTANT:",
    "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: ",
    "phi3": "<|user|> {task_template} <|end|> <|assistant|>",
}
"""RULER's model templates (scripts/data/template.py), by name; "chat" uses the tokenizer's own."""
CHAT_TEMPLATE = "chat"

HAYSTACKS = ("noise", "essay", "needle")
NEEDLE_TYPES = ("numbers", "words", "uuids")
SUBSET = "validation"
"""RULER's default subset: the file name of each task's JSONL."""


# ----------------------------------------------------------------------------- task table


@dataclass(frozen=True)
class NiahTask:
    """One RULER NIAH task (a row of synthetic.yaml with task: niah)."""

    name: str
    haystack: str
    """'noise' (RULER's repeated sentences), 'essay' (prose) or 'needle' (distractor needles)."""
    type_needle_k: str
    """Key kind: 'numbers', 'words' or 'uuids'."""
    type_needle_v: str
    """Value kind: 'numbers', 'words' or 'uuids'."""
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"NiahTask.haystack={self.haystack!r} is invalid: must be one of {', '.join(HAYSTACKS)}")
        for field in ("type_needle_k", "type_needle_v"):
            if getattr(self, field) not in NEEDLE_TYPES:
                raise ValueError(f"NiahTask.{field}={getattr(self, field)!r} is invalid: must be one of {', '.join(NEEDLE_TYPES)}")
        for field in ("num_needle_k", "num_needle_v", "num_needle_q"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NiahTask.{field}={value!r} is invalid: must be an int >= 1")

    @property
    def num_keys(self) -> int:
        """Keys in the text: RULER uses max(num_needle_k, num_needle_q)."""
        return max(self.num_needle_k, self.num_needle_q)

    @property
    def num_needles(self) -> int:
        """Real needles in the text (one per key and value); distractors not counted."""
        return self.num_keys * self.num_needle_v

    @property
    def num_answers(self) -> int:
        """Expected outputs: every value of every queried key."""
        return self.num_needle_q * self.num_needle_v


TASKS: dict[str, NiahTask] = {
    t.name: t
    for t in (
        NiahTask("niah_single_1", "noise", "words", "numbers",
                 description="one needle in repeated noise sentences (passkey retrieval)"),
        NiahTask("niah_single_2", "essay", "words", "numbers",
                 description="one needle in prose (vanilla NIAH)"),
        NiahTask("niah_single_3", "essay", "words", "uuids",
                 description="one needle with a UUID value in prose"),
        NiahTask("niah_multikey_1", "essay", "words", "numbers", num_needle_k=4,
                 description="four needles with different keys in prose; one key is asked"),
        NiahTask("niah_multikey_2", "needle", "words", "numbers",
                 description="the haystack is distractor needles with other word keys"),
        NiahTask("niah_multikey_3", "needle", "uuids", "uuids",
                 description="the haystack is distractor needles; UUID keys and values"),
        NiahTask("niah_multivalue", "essay", "words", "numbers", num_needle_v=4,
                 description="one key with four values in four needles; all four are asked"),
        NiahTask("niah_multiquery", "essay", "words", "numbers", num_needle_q=4,
                 description="four keys, all four asked in one question"),
    )
}
"""RULER's eight NIAH tasks, as scripts/synthetic.yaml defines them."""


def get_task(task: str | NiahTask) -> NiahTask:
    """The NiahTask for a name (ValueError listing the tasks when unknown) or the task itself."""
    if isinstance(task, NiahTask):
        return task
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a RULER NIAH task; choose from: {', '.join(TASKS)}")
    return TASKS[task]


def describe_tasks() -> str:
    """The task table as aligned text (name, haystack, key, value, k, v, q, description)."""
    header = ("task", "haystack", "keys", "values", "k", "v", "q", "description")
    rows = [header] + [
        (t.name, t.haystack, t.type_needle_k, t.type_needle_v, str(t.num_needle_k), str(t.num_needle_v),
         str(t.num_needle_q), t.description)
        for t in TASKS.values()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ----------------------------------------------------------------------------- keys and values

ADJECTIVES = (
    "able", "absent", "active", "agile", "alert", "ancient", "angry", "anxious", "arctic", "aromatic",
    "artistic", "awake", "bitter", "bland", "blank", "bold", "brave", "breezy", "brief", "bright",
    "brisk", "broad", "broken", "bumpy", "busy", "calm", "careful", "casual", "cheap", "cheerful",
    "chilly", "classic", "clean", "clear", "clever", "cloudy", "clumsy", "coastal", "cold", "colossal",
    "common", "cool", "cosmic", "cozy", "crisp", "crooked", "crowded", "cruel", "curious", "curly",
    "damp", "dark", "dazzling", "dear", "deep", "delicate", "dense", "dizzy", "dry", "dusty",
    "eager", "early", "earnest", "easy", "elegant", "empty", "endless", "equal", "exact", "faint",
    "fair", "famous", "fancy", "fast", "fierce", "final", "firm", "flat", "fluffy", "fond",
    "formal", "fragile", "free", "fresh", "friendly", "frozen", "fuzzy", "gentle", "giant", "gifted",
    "glad", "gloomy", "golden", "grand", "grateful", "green", "grumpy", "happy", "hardy", "harsh",
    "hasty", "heavy", "hidden", "hollow", "honest", "huge", "humble", "hungry", "icy", "idle",
    "jolly", "juicy", "keen", "kind", "large", "late", "lazy", "light", "little", "lively",
    "lonely", "loud", "lucky", "lunar", "mellow", "merry", "mighty", "misty", "modern", "modest",
    "muddy", "narrow", "neat", "nervous", "noble", "noisy", "obscure", "odd", "orange", "pale",
    "patient", "plain", "playful", "polite", "proud", "purple", "quick", "quiet", "rapid", "rare",
    "ready", "rich", "rigid", "ripe", "rough", "round", "royal", "rural", "rustic", "sandy",
    "scarlet", "shallow", "sharp", "shiny", "short", "shy", "silent", "silky", "silver", "simple",
    "sleepy", "slim", "slow", "small", "smooth", "snowy", "soft", "solar", "solid", "sour",
    "spicy", "steady", "steep", "sticky", "stormy", "strict", "strong", "sturdy", "subtle", "sunny",
    "sweet", "swift", "tall", "tame", "tender", "thick", "thin", "tidy", "tiny", "tough",
    "tranquil", "tropical", "upbeat", "urban", "vacant", "vast", "velvet", "vivid", "warm", "wary",
    "wealthy", "wild", "windy", "wise", "witty", "wooden", "young", "zealous",
)
"""Common adjectives (RULER draws from wonderwords' adjective list; this list ships with flexwalk)."""
NOUNS = (
    "acorn", "anchor", "apple", "arrow", "atlas", "badge", "bakery", "balloon", "banana", "banner",
    "barn", "basket", "beacon", "beetle", "bell", "bench", "berry", "bicycle", "blanket", "boat",
    "bottle", "branch", "bread", "breeze", "brick", "bridge", "brook", "brush", "bucket", "butter",
    "cabin", "cactus", "camera", "candle", "canoe", "canyon", "carpet", "castle", "cedar", "cellar",
    "chair", "channel", "cherry", "chimney", "circle", "cliff", "clock", "cloud", "coin", "comet",
    "compass", "copper", "cottage", "cotton", "crayon", "creek", "crystal", "cup", "curtain", "daisy",
    "desert", "diamond", "dolphin", "door", "dragon", "drum", "eagle", "engine", "falcon", "feather",
    "fence", "fern", "field", "flag", "flame", "flower", "forest", "fountain", "fox", "garden",
    "gate", "glacier", "globe", "glove", "granite", "grape", "harbor", "harvest", "hat", "hazel",
    "helmet", "hill", "honey", "horizon", "island", "ivory", "jacket", "jungle", "kettle", "kitten",
    "ladder", "lagoon", "lake", "lamp", "lantern", "lemon", "library", "lily", "lion", "magnet",
    "maple", "marble", "meadow", "mirror", "moon", "mountain", "nest", "notebook", "oak", "ocean",
    "olive", "orchard", "otter", "owl", "paddle", "palace", "panda", "paper", "parrot", "path",
    "peach", "pearl", "pebble", "pencil", "pepper", "piano", "pillow", "pine", "planet", "plum",
    "pond", "puzzle", "quilt", "rabbit", "rainbow", "raven", "ribbon", "river", "robin", "rocket",
    "saddle", "sail", "salmon", "sapphire", "scarf", "shadow", "shell", "ship", "shore", "silk",
    "sky", "slope", "snail", "sparrow", "spoon", "spring", "squirrel", "star", "statue", "stone",
    "storm", "stream", "sugar", "summit", "sunset", "swan", "table", "teapot", "temple", "thunder",
    "tiger", "timber", "tower", "trail", "train", "tree", "tulip", "tunnel", "turtle", "valley",
    "village", "violin", "volcano", "wagon", "walnut", "whale", "willow", "window", "winter", "wolf",
    "yacht", "zebra",
)
"""Concrete nouns (RULER: wonderwords' noun list)."""


def random_word(rng: random.Random) -> str:
    """An adjective-noun pair like RULER's ("calm-river"), uniform over ADJECTIVES x NOUNS."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_needle(rng: random.Random, kind: str) -> str:
    """A key or value of `kind`: 7-digit number, adjective-noun word pair or UUID (from `rng` only)."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return random_word(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle kind {kind!r} is invalid: must be one of {', '.join(NEEDLE_TYPES)}")


# ----------------------------------------------------------------------------- essay corpus

_HEADING = re.compile(r"^[*=\-~^#]{3,}$")
_TO_ASCII = str.maketrans({
    "\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2014": "--", "\u2013": "-",
})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z])")
_EMPHASIS = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf)\.$")


def _paragraphs(text: str) -> Iterable[str]:
    """Paragraphs of one pydoc topic, headings dropped, lines joined."""
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip() and not _HEADING.match(line.strip())]
        if lines:
            yield " ".join(line.strip() for line in lines)


def _sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph; splits after . ! ? before a capital, not after e.g. / i.e."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        if out and _ABBREVIATION.search(out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 4 <= len(words) <= 60 or not sentence.isascii() or sentence[-1] not in ".!?":
        return False
    if not (sentence[0].isupper() or sentence[0] in "\"'"):
        return False
    return sum(c.isalpha() or c == " " for c in sentence) >= 0.8 * len(sentence)


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """The "essay" haystack: English sentences from Python's documentation (pydoc_data.topics).

    Topics in sorted order; code blocks, grammar rules, interactive examples, headings and
    footnotes dropped; reST emphasis removed; typographic quotes and dashes made ASCII; kept
    sentences have 4-60 words, start with a capital, end with . ! or ? and are >= 80% letters.
    About 2,700 sentences, 48,000 words (~60k tokens) with Python 3.11.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split the docs out of the stdlib
        raise ImportError("the 'essay' haystack needs pydoc_data.topics from Python's standard library") from exc
    sentences: list[str] = []
    for key in sorted(topics):
        for paragraph in _paragraphs(topics[key]):
            if paragraph.startswith(("* ", "- ")):
                paragraph = paragraph[2:]
            if ">>>" in paragraph or "::=" in paragraph or paragraph.startswith(("-[", "..")):
                continue
            paragraph = _EMPHASIS.sub(r"\1", paragraph.translate(_TO_ASCII))
            paragraph = re.sub(r"\s+", " ", re.sub(r"\[\d+\]", "", paragraph)).strip()
            sentences.extend(s.strip() for s in _sentences(paragraph) if _is_prose(s.strip()))
    if not sentences:
        raise RuntimeError("pydoc_data.topics yielded no prose sentences for the 'essay' haystack")
    return tuple(sentences)


@functools.lru_cache(maxsize=1)
def essay_fingerprint() -> str:
    """'pydoc_data.topics sha256:<12 hex>' of the cleaned essay text (it changes with Python releases)."""
    digest = hashlib.sha256("\n".join(essay_sentences()).encode()).hexdigest()[:12]
    return f"pydoc_data.topics sha256:{digest}"


# ----------------------------------------------------------------------------- haystack streams


class _Stream:
    """An endless sequence of haystack segments (sentences or lines); its first n words on demand."""

    def __init__(self, joiner: str, next_segment: Callable[[int], str]):
        self.joiner = joiner
        self._next = next_segment
        self._segments: list[str] = []
        self._ends: list[int] = []  # cumulative word counts at the end of each segment

    def _extend(self, words: int) -> None:
        while not self._ends or self._ends[-1] < words:
            segment = self._next(len(self._segments))
            self._segments.append(segment)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(segment.split()))

    def prefix(self, words: int, chars: int = 0) -> list[str]:
        """Segments holding exactly the first `words` words (and `chars` characters of the next one).

        The last segment may be cut after a word (or inside the next word when chars > 0).
        """
        if chars > 0:
            segments = self.prefix(words + 1)
            last = segments[-1]
            segments[-1] = last[: len(last) - len(last.rsplit(" ", 1)[-1]) + chars]
            return segments
        if words <= 0:
            return []
        self._extend(words)
        full = bisect.bisect_right(self._ends, words)
        segments = self._segments[:full]
        done = self._ends[full - 1] if full else 0
        if done < words:
            segments.append(" ".join(self._segments[full].split()[: words - done]))
        return segments


def _haystack_stream(task: NiahTask, rng: random.Random, real_keys: set[str]) -> _Stream:
    if task.haystack == "noise":
        return _Stream("\n", lambda i: NOISE)
    if task.haystack == "essay":
        corpus = essay_sentences()
        return _Stream(" ", lambda i: corpus[i % len(corpus)])  # repeated past its end, as RULER does

    def distractor(_: int) -> str:
        key = random_needle(rng, task.type_needle_k)
        while key in real_keys:
            key = random_needle(rng, task.type_needle_k)
        return NEEDLE.format(type_needle_v=task.type_needle_v, key=key, value=random_needle(rng, task.type_needle_v))

    return _Stream("\n", distractor)


# ----------------------------------------------------------------------------- prompt template


@dataclass(frozen=True)
class _Prompt:
    """The fixed text around the haystack: input = head + context + tail; then answer_prefix."""

    head: str
    tail: str
    answer_prefix: str


def _model_wrapper(template: str, tokenizer: Any) -> str:
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


def _prompt(task: NiahTask, wrapper: str, query: str) -> _Prompt:
    """RULER's template for this task; singular wording when one answer is expected (as RULER)."""
    template, prefix, kind = TASK_TEMPLATE, ANSWER_PREFIX, task.type_needle_v
    if task.num_needle_q * task.num_needle_v == 1:
        # RULER applies these replacements to the template (answer prefix included).
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        kind = kind[:-1]
    body = template.format(type_needle_v=kind, context=_CONTEXT, query=query)
    head, tail = wrapper.replace("{task_template}", body).split(_CONTEXT)
    return _Prompt(head, tail, prefix.format(type_needle_v=kind, query=query))


# ----------------------------------------------------------------------------- one sample


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


@dataclass(frozen=True)
class _Rendered:
    text: str
    """input + answer_prefix."""
    context: tuple[int, int]
    """Character span of the haystack with needles."""
    needle_spans: list[tuple[int, int]]
    """Character spans of the real needles, in the order of _Needles.needles."""


def _render(prompt: _Prompt, stream: _Stream, needles: Sequence[tuple[str, float]], words: int,
            chars: int = 0) -> _Rendered:
    """The sample with the first `words` haystack words (+ `chars` characters) and each needle at its depth.

    A needle goes at the segment boundary whose share of the haystack's characters is closest
    to its depth (ties: earlier boundary); needles at one boundary keep their order by depth.
    """
    segments = stream.prefix(words, chars)
    sep = len(stream.joiner)
    starts = [0]
    for s in segments:
        starts.append(starts[-1] + len(s) + sep)
    total = max(starts[-1] - sep, 0)
    slots: list[tuple[int, float, int]] = []
    for i, (_, depth) in enumerate(needles):
        target = depth * total
        b = bisect.bisect_left(starts, target)
        if b == len(starts) or (b > 0 and target - starts[b - 1] <= starts[b] - target):
            b -= 1
        slots.append((max(b, 0), depth, i))
    slots.sort()
    parts: list[str] = []
    spans: dict[int, tuple[int, int]] = {}
    pos, k = len(prompt.head), 0
    for b in range(len(segments) + 1):
        while k < len(slots) and slots[k][0] == b:
            text = needles[slots[k][2]][0]
            if parts:
                pos += sep
            spans[slots[k][2]] = (pos, pos + len(text))
            parts.append(text)
            pos += len(text)
            k += 1
        if b < len(segments):
            if parts:
                pos += sep
            parts.append(segments[b])
            pos += len(segments[b])
    context = stream.joiner.join(parts)
    text = prompt.head + context + prompt.tail + prompt.answer_prefix
    start = len(prompt.head)
    return _Rendered(text, (start, start + len(context)), [spans[i] for i in range(len(needles))])


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


# ----------------------------------------------------------------------------- public API


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
    wrapper = _model_wrapper(template, tokenizer)
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
        stream = _haystack_stream(spec, random.Random(f"flexwalk.niah/{seed}/{spec.name}/{index}/haystack"),
                                  set(drawn.keys))

        @functools.lru_cache(maxsize=None)
        def count(words: int, chars: int = 0) -> int:
            return len(tokenizer(_render(prompt, stream, drawn.needles, words, chars).text).input_ids)

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
        rendered = _render(prompt, stream, drawn.needles, words, chars)
        record = _record(tokenizer, spec, rendered, drawn, prompt, index=index, length=length, seed=seed,
                         depth=depth, input_length=input_length, tokens_to_generate=tokens_to_generate,
                         template=template, source=source)
        records.append(record)
        if on_sample is not None:
            on_sample(record)
    return records


def _record(tokenizer: Any, spec: NiahTask, rendered: _Rendered, drawn: _Needles, prompt: _Prompt, *,
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
    _model_wrapper(template, tokenizer)
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


# ----------------------------------------------------------------------------- command line


def parse_length(text: str) -> int:
    """'4096', '4k' (4096), '128K' (131072) or '1m' -> tokens; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a token count: use e.g. 4096 or 4k (k = 1024)")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"{text!r} is not a positive token count")
    return value


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


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `flexwalk niah generate` (see generate_main)."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="packaged model name (smollm2-135m, gemma3-270m) or a local model/tokenizer directory; "
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
    from ..models import PACKAGED, is_cached

    prog = "flexwalk niah generate"
    if args.model in PACKAGED and not is_cached(args.model):
        print(f"{prog}: first use of {args.model}: converting its GGUF file once (~20-60 s)", file=sys.stderr)
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
