"""flexwalk's own decode loops pass and read the KV cache under the name the installed transformers
takes (`flexwalk.integrations.cache_kwarg`): transformers 5.24 renamed `past_key_values` to
`cache` and warns on every forward and every output read under the old name."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import pytest
import torch
import transformers

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk.generation import greedy, greedy_batch
from flexwalk.integrations.cache_kwarg import cache_kwarg, cache_kwargs, returned_cache

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import build_model, random_ids  # noqa: E402


class _DeprecationLogged(Exception):
    pass


class _RaiseOnDeprecation(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "deprecated" in record.getMessage():
            raise _DeprecationLogged(record.getMessage())


@contextlib.contextmanager
def deprecations_are_errors():
    """Python warnings raise, and so does a deprecation that transformers logs (output reads under
    the old name warn through its logger, once per process: that memory is cleared first)."""
    once = getattr(transformers.utils.logging, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    log = logging.getLogger("transformers")
    handler = _RaiseOnDeprecation(logging.WARNING)
    log.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        log.removeHandler(handler)


def _model():
    model = build_model("llama", "sketchwalk_flex")
    return flexwalk.configure(model, SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=1,
                                                      skip_decode=False, decode_dense_steps=0))


def test_greedy_loops_raise_no_deprecation_warning():
    model = _model()
    rows = [random_ids(1, n, seed=60 + n)[0].tolist() for n in (70, 54)]
    with deprecations_are_errors():
        new, _, _, finite = greedy(model, rows[0], 6, set())
        flexwalk.reset_decode_state(model)
        batch, _, _ = greedy_batch(model, rows, 6, set(), pad_id=0)
    assert finite and len(new) == 6
    assert batch[0][0] == new  # the left-padded batch's unpadded row decodes as it does alone
    assert flexwalk.counters()["sparse_decode"] > 0


def test_the_cache_goes_in_and_comes_out_under_one_name():
    model = _model()
    ids = random_ids(1, 40, seed=3)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad(), deprecations_are_errors():
        out = model(ids, **cache_kwargs(cache), use_cache=True)
        assert returned_cache(out) is cache
    assert cache.get_seq_length() == 40
    if cache_kwarg() == "cache":  # the old name warns here: what the loops above would have met
        with torch.no_grad(), pytest.raises((FutureWarning, _DeprecationLogged)), deprecations_are_errors():
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
