import dataclasses
import math

import pytest

from flexwalk import PRESETS, SketchWalkConfig, expected_density
from conftest import block_budget


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_size", 48),
        ("block_size", 8),
        ("block_size", 512),
        ("block_size", True),
        ("query_block_size", 96),  # not a multiple of block_size 64
        ("query_block_size", 192),  # a multiple, not a power of two
        ("query_block_size", 512),  # above 256
        ("query_block_size", 32),  # smaller than block_size
        ("query_block_size", True),
        ("query_block_size", 128.0),
        ("sketch_dim", 0),
        ("sketch_dim", 64.0),
        ("sketch_dim", "exact"),
        ("sparsity_exponent", 0.0),
        ("sparsity_exponent", float("nan")),
        ("density", 0.0),
        ("density", 1.5),
        ("sink_blocks", -1),
        ("local_blocks", 0),
        ("dense_tail_blocks", -2),
        ("dense_layers", -1),
        ("dense_layers", "all"),
        ("dense_layers", 2.0),
        ("walk", "random"),
        ("damping", 1.5),
        ("walk_steps", 0),
        ("walk_steps", 9),
        ("walk_steps", 2.0),
        ("walk_steps", True),
        ("head_scoring", "max"),
        ("prefill_scoring", "max"),
        ("decode_scoring", "mean"),
        ("seed", -3),
        ("dense_below", -1),
        ("dense_below", "fast"),
        ("skip_decode", "yes"),
        ("skip_prefill", 1),
    ],
)
def test_invalid_field_names_field_value_and_rule(field, value):
    with pytest.raises(ValueError) as e:
        SketchWalkConfig(**{field: value})
    msg = str(e.value)
    assert f"SketchWalkConfig.{field}={value!r}" in msg
    assert "must" in msg


def test_query_block_size_is_a_power_of_two_multiple_of_block_size():
    assert SketchWalkConfig().q_block == 64 and SketchWalkConfig().query_block_size is None
    for bs, qbs in ((64, 64), (64, 128), (64, 256), (16, 32), (16, 128), (128, 256), (256, 256)):
        assert SketchWalkConfig(block_size=bs, query_block_size=qbs).q_block == qbs
    with pytest.raises(ValueError, match=r"query_block_size=64 is invalid: .*block_size=128 to 256"):
        SketchWalkConfig(block_size=128, query_block_size=64)
    with pytest.raises(ValueError, match=r"query_block_size=48 is invalid: must be None or a power of two"):
        SketchWalkConfig(block_size=16, query_block_size=48)
    cfg = SketchWalkConfig(query_block_size=128)
    assert SketchWalkConfig.from_dict(cfg.to_dict()) == cfg and cfg != SketchWalkConfig()


def test_budget_needs_exactly_one_of_density_and_top_k():
    with pytest.raises(ValueError, match="exactly one of density"):
        SketchWalkConfig(density=0.2, top_k_blocks=4)
    assert SketchWalkConfig(top_k_blocks=8).density is None  # a top-k budget replaces the default density
    assert SketchWalkConfig().density == 0.2
    with pytest.raises(ValueError, match=r"top_k_blocks=0"):
        SketchWalkConfig(density=None, top_k_blocks=0)


def test_phase_modes():
    assert SketchWalkConfig().skip_decode and not SketchWalkConfig().skip_prefill  # prefill-only by default
    assert not SketchWalkConfig(skip_decode=False).skip_decode  # prefill and decode sparse
    decode_only = SketchWalkConfig(skip_decode=False, skip_prefill=True)
    assert decode_only.skip_prefill
    with pytest.raises(ValueError, match="skip_prefill=True and skip_decode=True"):
        SketchWalkConfig(skip_prefill=True)
    # the decode state carries W_l under the mean-key rule: sparse decode's walk needs it in prefill too
    assert SketchWalkConfig().prefill_scoring == "bound" and SketchWalkConfig(skip_decode=False).walk == "one_hop"
    assert SketchWalkConfig(skip_decode=False, walk="damped", prefill_scoring="sketch").walk == "damped"
    assert SketchWalkConfig(walk="damped").walk == "damped"  # decode dense: no state
    with pytest.raises(ValueError, match=r"walk='damped' is invalid: .*skip_decode=False.*prefill_scoring='sketch'"):
        SketchWalkConfig(skip_decode=False, walk="damped")
    from flexwalk import DecodeState

    with pytest.raises(ValueError, match=r"walk='walk' needs prefill_scoring='sketch'"):
        DecodeState(SketchWalkConfig(walk="walk"), 0, batch=1, q_heads=2, k_heads=1, head_dim=16, scale=0.25,
                    kv_tokens=64, device="cpu")


def test_frozen_replace_and_dict_roundtrip():
    cfg = SketchWalkConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 128  # type: ignore[misc]
    k = cfg.replace(top_k_blocks=6)
    assert k.top_k_blocks == 6 and k.density is None
    assert k.replace(density=0.5).top_k_blocks is None
    assert SketchWalkConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        SketchWalkConfig.from_dict({"blocksize": 64})


def test_presets_are_valid_and_distinct():
    assert set(PRESETS) == {"default", "quality", "speed", "long-context"}
    assert len(set(PRESETS.values())) == len(PRESETS)
    assert SketchWalkConfig.preset("speed", density=0.2).block_size == 128
    with pytest.raises(ValueError, match="preset='fast'"):
        SketchWalkConfig.preset("fast")


def test_expected_density_limits_and_monotonicity():
    assert expected_density(SketchWalkConfig(density=1.0), 5000) == 1.0
    densities = [expected_density(SketchWalkConfig(density=d, dense_tail_blocks=0), 65536) for d in (0.1, 0.2, 0.3)]
    assert densities == sorted(densities)
    # At long lengths the forced blocks are a vanishing share: density approaches the budget.
    assert abs(densities[1] - 0.2) < 0.01
    # Model-wide: dense layers count fully, short prompts are fully dense.
    cfg = SketchWalkConfig(dense_layers=2)
    per_layer = expected_density(cfg, 8192)
    assert math.isclose(expected_density(cfg, 8192, num_layers=10), (2 + 8 * per_layer) / 10)
    assert expected_density(cfg, 100, num_layers=10) == 1.0
    with pytest.raises(ValueError, match="seq_len=0"):
        expected_density(cfg, 0)
    # Pooled query blocks: the same limit at long lengths; at short ones the two forced
    # diagonal key blocks of each 128-row block weigh more than one of a 64-row block.
    pooled = SketchWalkConfig(query_block_size=128, dense_tail_blocks=0)
    assert abs(expected_density(pooled, 65536) - 0.2) < 0.01
    assert expected_density(pooled, 2048) > expected_density(pooled.replace(query_block_size=None), 2048)
    assert expected_density(pooled.replace(query_block_size=64), 3000) == expected_density(
        pooled.replace(query_block_size=None), 3000)


def test_block_budget_keeps_forced_and_clamps():
    cfg = SketchWalkConfig(density=0.1)
    assert block_budget(cfg, n_causal=3, forced=2) == 2
    assert block_budget(cfg, n_causal=100, forced=2) == 10
    assert block_budget(SketchWalkConfig(density=None, top_k_blocks=50), n_causal=7, forced=2) == 7


def test_dense_below_auto_depends_on_the_device(monkeypatch):
    """dense_below="auto" (the default) is 8192 on CUDA and 2048 elsewhere; an int is used as
    given everywhere; and the attention path looks the threshold up for its tensors' device."""
    import torch

    import flexwalk
    from flexwalk import config as cmod
    from flexwalk.selection.topk import expected_density

    cfg = SketchWalkConfig()
    assert cfg.dense_below == "auto"
    assert cfg.min_sparse_length("cuda") == cfg.min_sparse_length(torch.device("cuda", 1)) == 8192
    assert cfg.min_sparse_length("cpu") == cfg.min_sparse_length(torch.device("cpu")) == 2048
    assert SketchWalkConfig(dense_below=300).min_sparse_length("cuda") == 300
    assert SketchWalkConfig.from_dict(cfg.to_dict()) == cfg
    assert expected_density(cfg, 4096, 30, device="cuda") == 1.0 > expected_density(cfg, 4096, 30)
    q = torch.randn(1, 2, 600, 16)
    k = torch.randn(1, 2, 600, 16)
    sparse = SketchWalkConfig(block_size=16, dense_layers=0)
    for threshold, path in ((500, "sparse_prefill"), (601, "dense_short")):
        monkeypatch.setitem(cmod.AUTO_DENSE_BELOW, "cpu", threshold)
        flexwalk.reset_counters()
        with torch.compiler.set_stance("force_eager"):  # the route is the point here, not the kernel
            flexwalk.sketchwalk_attention(q, k, k.clone(), sparse, 0)
        assert flexwalk.counters() == {path: 1}
