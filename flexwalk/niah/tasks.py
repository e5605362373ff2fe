"""RULER's eight needle-in-a-haystack tasks and their text: needle sentence, prompt template,
answer prefix, noise haystack and model templates.

The tasks, needle sentence, prompt template, answer prefix and noise haystack are RULER's
(NVIDIA/RULER ``scripts/synthetic.yaml``, ``scripts/data/synthetic/niah.py`` and
``constants.py``).  What differs, because nothing may be downloaded: the "essay" haystack is
prose from Python's own documentation (``pydoc_data.topics``) instead of Paul Graham essays,
and key/value words are adjective-noun pairs from word lists in this module instead of the
wonderwords package.  Each record's ``input + answer_prefix``, tokenized exactly as
``tokenizer(text).input_ids``, is the longest that fits ``length - tokens_to_generate``
(search over the haystack size in words); the needle holding the first expected answer sits
at the requested depth.  See docs/niah-data.md; the haystacks are built in niah.haystack and the
records in niah.dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

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
