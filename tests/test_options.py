"""flexwalk.Options: validation, scopes (nesting, restoring), per-model settings, and that each
value changes the path that runs (seen through flexwalk.counters())."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import flexwalk
from conftest import random_qkv
from flexwalk import SketchWalkConfig
from flexwalk.options import Options

SPARSE = SketchWalkConfig(block_size=16, density=0.3, dense_layers=0, dense_below=0, sketch_dim=16)


def test_defaults_are_the_measured_ones():
    o = flexwalk.current_options()
    assert o == Options() and flexwalk.options.Options is Options
    assert (o.prefill_kernel, o.decode_kernel, o.summary_kernel, o.fa4_mask) == ("auto", "auto", "auto", "causal")
    assert o.triton_selection and o.graph_selection and o.decode_graphs and o.fa4_auto
    assert o.split_dense_tail == "cuda" and o.split_dense_tail_min_tokens == 16384
    assert o.graph_selection_max_tokens == 131072 and o.compile_selection == o.compile_decode == "cuda"
    for f in dataclasses.fields(Options):
        assert f.name in Options.__doc__ or f.name in _field_docs(), f.name


def _field_docs() -> str:
    import inspect

    return inspect.getsource(Options)


@pytest.mark.parametrize("fields, message", [
    ({"prefill_kernel": "cutlass"}, "prefill_kernel='cutlass' is invalid: allowed auto, fa4, triton, flex"),
    ({"decode_kernel": "cuda"}, "decode_kernel='cuda' is invalid: allowed auto, flex, triton"),
    ({"summary_kernel": 1}, "summary_kernel=1 is invalid: allowed auto, triton, torch"),
    ({"fa4_mask": "tril"}, "fa4_mask='tril' is invalid: allowed causal, mask_mod"),
    ({"split_dense_tail": True}, "split_dense_tail=True is invalid: allowed cuda, always, never"),
    ({"compile_decode": "cpu"}, "compile_decode='cpu' is invalid: allowed cuda, always, never"),
    ({"decode_graphs": 1}, "decode_graphs=1 is invalid: allowed True, False"),
    ({"graph_selection_max_tokens": -1}, "graph_selection_max_tokens=-1 is invalid: allowed an int >= 0"),
    ({"selection_row_warps": 0}, "selection_row_warps=0 is invalid: allowed None or an int >= 1"),
    ({"fa4_shapes": {(1, 2)}}, "fa4_shapes={(1, 2)} is invalid"),
    ({"prefil_kernel": "flex"}, "prefil_kernel='flex' is unknown: allowed fields prefill_kernel, fa4_auto"),
])
def test_an_unknown_field_or_value_names_the_field_the_value_and_what_is_allowed(fields, message):
    for make in (lambda: Options(**fields), lambda: flexwalk.options(**fields).__enter__(),
                 lambda: flexwalk.options.set_options(**fields), lambda: Options().replace(**fields)):
        with pytest.raises((ValueError, TypeError)) as err:
            make()
        if isinstance(err.value, ValueError):
            assert message in str(err.value)
    assert flexwalk.current_options() == Options()  # nothing was set by the failed calls


def test_scopes_nest_and_restore():
    with flexwalk.options(prefill_kernel="flex") as outer:
        assert outer.prefill_kernel == "flex" and flexwalk.current_options() is outer
        with flexwalk.options(decode_kernel="triton", prefill_kernel="triton") as inner:
            assert (inner.prefill_kernel, inner.decode_kernel) == ("triton", "triton")
        assert flexwalk.current_options() == Options(prefill_kernel="flex")
        with pytest.raises(RuntimeError):
            with flexwalk.options(decode_graphs=False):
                raise RuntimeError
        assert flexwalk.current_options().decode_graphs is True
    assert flexwalk.current_options() == Options()


def test_a_scope_is_per_thread():
    seen = []
    with flexwalk.options(prefill_kernel="flex"):
        t = threading.Thread(target=lambda: seen.append(flexwalk.current_options().prefill_kernel))
        t.start()
        t.join()
    assert seen == ["auto"]


def test_set_options_lasts_until_the_scope_ends():
    with flexwalk.options(prefill_kernel="flex"):
        flexwalk.options.set_options(decode_kernel="triton")
        assert flexwalk.current_options() == Options(prefill_kernel="flex", decode_kernel="triton")
    assert flexwalk.current_options() == Options()


def test_the_prefill_kernel_option_picks_the_kernel():
    q, k, v = random_qkv(1, 2, 1, 64, 16, seed=1)
    with flexwalk.options(prefill_kernel="triton"):
        flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0)
    assert flexwalk.counters()["triton_prefill"] == 1
    with flexwalk.options(prefill_kernel="flex"):
        flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0)
    assert flexwalk.counters()["triton_prefill"] == 1 and flexwalk.counters()["sparse_prefill"] == 2
    # an explicit Options object instead of the scope's
    flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0, options=Options(prefill_kernel="triton"))
    assert flexwalk.counters()["triton_prefill"] == 2


def test_selection_options_pick_the_selection():
    q, k, v = random_qkv(1, 2, 1, 64, 16, seed=2)
    flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0)
    assert "triton_selection" not in flexwalk.counters()  # CPU: the torch selection
    with flexwalk.options(triton_selection_on_cpu=True):
        flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0)
        assert flexwalk.counters()["triton_selection"] == 1
        with flexwalk.options(triton_selection=False):
            flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0)
        assert flexwalk.counters()["triton_selection"] == 1


def test_the_split_dense_tail_option_splits_the_tail():
    q, k, v = random_qkv(1, 2, 1, 100, 16, seed=3)
    flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0)
    assert "dense_tail_split" not in flexwalk.counters()  # "cuda": not on the CPU
    with flexwalk.options(split_dense_tail="always"):
        flexwalk.sketchwalk_attention(q, k, v, SPARSE, 0)
    assert flexwalk.counters()["dense_tail_split"] == 1


@pytest.mark.parametrize("kernel", ["flex", "triton"])
def test_the_decode_kernel_option_picks_the_kernel(kernel):
    q, k, v = random_qkv(1, 2, 1, 41, 16, seed=4)
    state = flexwalk.DecodeState.from_prefill(q[:, :, :40], k[:, :, :40], SPARSE, 0)
    with flexwalk.options(decode_kernel=kernel):
        flexwalk.sketchwalk_decode(q[:, :, 40:], k, v, state)
    assert flexwalk.counters().get("triton_decode", 0) == (kernel == "triton")


def test_configure_sets_the_options_of_one_model():
    """Two models, one configured with the Triton prefill kernel: only its layers run it; a scope
    applies over the model's own fields; a later configure replaces them."""
    from tiny_models import build_model, random_ids

    ids = random_ids(1, 64, seed=5)
    a = flexwalk.configure(build_model("llama"), SPARSE, prefill_kernel="triton")
    b = flexwalk.configure(build_model("llama"), SPARSE)
    n_layers = a.config.num_hidden_layers
    with torch.no_grad():
        b(ids)
        assert "triton_prefill" not in flexwalk.counters()
        a(ids)
        assert flexwalk.counters()["triton_prefill"] == n_layers
        with flexwalk.options(prefill_kernel="flex"):  # the scope over the model's field
            a(ids)
        assert flexwalk.counters()["triton_prefill"] == n_layers
        flexwalk.configure(a, SPARSE)
        a(ids)
        assert flexwalk.counters()["triton_prefill"] == n_layers
    with pytest.raises(ValueError, match="prefill_kernel='fast' is invalid"):
        flexwalk.configure(a, SPARSE, prefill_kernel="fast")
    with pytest.raises(ValueError, match="prefil_kernel='flex' is unknown"):
        flexwalk.configure(a, SPARSE, prefil_kernel="flex")
