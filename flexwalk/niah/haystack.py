"""The haystack around the needles: keys and values (word pairs, numbers, UUIDs), the "essay"
prose from Python's own documentation, endless haystack streams, and the text of one sample with
each needle placed at its depth."""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
import re
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .tasks import NEEDLE, NEEDLE_TYPES, NOISE, NiahTask

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


class Stream:
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


def haystack_stream(task: NiahTask, rng: random.Random, real_keys: set[str]) -> Stream:
    if task.haystack == "noise":
        return Stream("\n", lambda i: NOISE)
    if task.haystack == "essay":
        corpus = essay_sentences()
        return Stream(" ", lambda i: corpus[i % len(corpus)])  # repeated past its end, as RULER does

    def distractor(_: int) -> str:
        key = random_needle(rng, task.type_needle_k)
        while key in real_keys:
            key = random_needle(rng, task.type_needle_k)
        return NEEDLE.format(type_needle_v=task.type_needle_v, key=key, value=random_needle(rng, task.type_needle_v))

    return Stream("\n", distractor)


@dataclass(frozen=True)
class Prompt:
    """The fixed text around the haystack: input = head + context + tail; then answer_prefix."""

    head: str
    tail: str
    answer_prefix: str


@dataclass(frozen=True)
class Rendered:
    text: str
    """input + answer_prefix."""
    context: tuple[int, int]
    """Character span of the haystack with needles."""
    needle_spans: list[tuple[int, int]]
    """Character spans of the real needles, in the order of _Needles.needles."""


def render(prompt: Prompt, stream: Stream, needles: Sequence[tuple[str, float]], words: int,
            chars: int = 0) -> Rendered:
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
    return Rendered(text, (start, start + len(context)), [spans[i] for i in range(len(needles))])
