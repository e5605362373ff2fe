"""Tensor parallelism, functional API: two gloo processes, each holding half of the heads, select
the same blocks as one process holding all of them, and their outputs are that process's."""

from __future__ import annotations

import itertools
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk.integrations.cache_kwarg import cache_kwargs, returned_cache

HQ, HKV, N, D, LAYERS = 8, 4, 300, 16, 3
_BASE = dict(block_size=16, density=0.3, dense_below=0, dense_layers=0)
CONFIGS = {  # each prefill scoring with each head scoring
    f"{scoring}-{heads}": SketchWalkConfig(**_BASE, prefill_scoring=scoring, head_scoring=heads)
    for scoring in ("sketch", "bound") for heads in ("mean", "per_head")
}


def _inputs(kv_heads: int = HKV):
    """LAYERS layers of q, k, v (fp32) with kv_heads KV heads (HKV, or 2: one per rank, whose head
    mean is the rank's keys themselves), and the validity (left padding in row 1)."""
    g = torch.Generator().manual_seed(7)
    layers = [tuple(torch.randn(2, h, N, D, generator=g) for h in (HQ, HKV, HKV)) for _ in range(LAYERS)]
    layers = [(q, k[:, :kv_heads], v[:, :kv_heads]) for q, k, v in layers]
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1, :45] = False
    return layers, valid


KV_LAYOUTS = (HKV, 2)  # two KV heads per rank, one


def _run(layers, valid, cfg, group=None, heads=None):
    """Outputs and selection tables of LAYERS sparse layers, the walk carried across them."""
    outs, tables, state = [], [], None
    for i, (q, k, v) in enumerate(layers):
        if heads is not None:
            (q0, q1), (k0, k1) = heads
            # a rank's own tensors (contiguous): with one KV head, its head-mean key is k itself
            q, k, v = (x.contiguous() for x in (q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]))
        sel, _ = flexwalk.sketchwalk_selection(q, k, cfg, i, state, key_valid=valid, process_group=group)
        out, state = flexwalk.sketchwalk_attention(q, k, v, cfg, i, state, key_valid=valid, process_group=group)
        outs.append(out)
        tables.append(sel.mask)
    return outs, tables


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = {}
        for kv in KV_LAYOUTS:
            layers, valid = _inputs(kv)
            hq, hkv = HQ // world, kv // world
            heads = ((rank * hq, (rank + 1) * hq), (rank * hkv, (rank + 1) * hkv))
            result.update({(kv, name): _run(layers, valid, cfg, dist.group.WORLD, heads) for name, cfg in CONFIGS.items()})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kv, (name, cfg) in itertools.product(KV_LAYOUTS, CONFIGS.items()):
        layers, valid = _inputs(kv)
        real = valid[:, None, :, None]
        ref_outs, ref_tables = _run(layers, valid, cfg)
        case = f"{name}, {kv // 2} KV head(s) per rank"
        for i in range(LAYERS):
            t0, t1 = ranks[0][kv, name][1][i], ranks[1][kv, name][1][i]
            assert torch.equal(t0, t1), f"{case} layer {i}: the ranks selected different blocks"
            assert torch.equal(t0, ref_tables[i]), f"{case} layer {i}: TP selection != single process"
            out = torch.cat([ranks[0][kv, name][0][i], ranks[1][kv, name][0][i]], dim=1)  # heads back together
            err = ((out - ref_outs[i]) * real).abs().max().item()
            assert err <= 1e-5, f"{case} layer {i}: TP output differs by {err:.3g}"
        assert any(not t.all() for t in ref_tables), "the budget must be sparse for the test to mean anything"


# ----------------------------------------------------------------------------- transformers tp_plan

DECODE_CFG = SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=1, skip_decode=False, decode_dense_steps=0)
STEPS = 6


def _decode_steps(model, ids, mask):
    """Prefill, then STEPS one-token steps with a growing cache on fixed (teacher-forced) tokens:
    the last-position logits of every step and the layer counters."""
    forced = torch.randint(0, model.config.vocab_size, (ids.shape[0], STEPS), generator=torch.Generator().manual_seed(1))
    flexwalk.reset_counters()
    flexwalk.reset_decode_state(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(STEPS):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            out = model(forced[:, t : t + 1], attention_mask=mask, **cache_kwargs(returned_cache(out)), use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), flexwalk.counters()


def _tp_worker(rank: int, world: int, store: str, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from transformers import AutoModelForCausalLM

        from flexwalk.integrations.settings import set_process_group

        cfg = SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=1)
        try:  # transformers >= 5.17 takes the plan in a DistributedConfig
            from transformers import DistributedConfig

            kwargs = {"distributed_config": DistributedConfig(tp_plan="auto")}
        except ImportError:
            kwargs = {"tp_plan": "auto"}
        tp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
        assert getattr(tp, "tp_size", None) == world
        flexwalk.configure(tp, cfg)  # finds the model's device mesh group
        ids = torch.randint(0, tp.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 300, dtype=torch.long)
        mask[1, :37] = 0  # left padding
        with torch.no_grad():
            flexwalk.reset_counters()
            mesh_logits = tp(ids, attention_mask=mask).logits
            counts = flexwalk.counters()
            set_process_group(tp, None)  # no recorded group: the default world of tp_plan="auto"
            world_logits = tp(ids, attention_mask=mask).logits
        flexwalk.configure(tp, DECODE_CFG)
        decode_logits, decode_counts = _decode_steps(tp, ids, mask)
        torch.save({"mesh": mesh_logits, "world": world_logits, "counts": counts, "decode": decode_logits,
                    "decode_counts": decode_counts}, os.path.join(out_dir, f"tp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_transformers_tp_plan_matches_one_process(tmp_path):
    """A tiny Llama under transformers' tp_plan="auto" on two gloo ranks (each with half of the
    heads) gives the single-process sketchwalk_flex logits, and differs from dense by far more;
    in prefill and in sparse decode steps (the decode state's head means all-reduced per step:
    without that all-reduce the step logits differ by ~0.1)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    LlamaForCausalLM(conf).save_pretrained(tmp_path / "tiny")
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "tiny"), str(tmp_path)), nprocs=2,
             join=True)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32)
    flexwalk.configure(one, SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=1))
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :37] = 0
    with torch.no_grad():
        sparse = one(ids, attention_mask=mask).logits
        one.set_attn_implementation("sdpa")
        dense = one(ids, attention_mask=mask).logits
    real = mask.bool()[..., None]
    gap = ((sparse - dense) * real).abs().max().item()
    assert gap > 1e-2  # the budget is sparse enough to matter
    # Sparse decode: the same prefill and steps in one process, and with dense decode steps.
    flexwalk.configure(one, DECODE_CFG)
    dec_one, counts_one = _decode_steps(one, ids, mask)
    flexwalk.configure(one, DECODE_CFG.replace(skip_decode=True))
    dec_dense_steps, _ = _decode_steps(one, ids, mask)
    assert counts_one["sparse_decode"] == 3 * STEPS  # 3 sparse layers x STEPS steps
    decode_gap = (dec_one[:, 1:] - dec_dense_steps[:, 1:]).abs().max().item()
    assert decode_gap > 1e-2, "the decode steps must be sparse enough to matter"
    for rank in range(2):
        got = torch.load(tmp_path / f"tp{rank}.pt")
        assert got["counts"] == {"dense_layer": 1, "sparse_prefill": 3}
        for key in ("mesh", "world"):
            err = ((got[key] - sparse) * real).abs().max().item()
            # fp32; the TP all-reduces only change summation order (~1e-7 relative)
            assert err < 1e-4, (rank, key, err, gap)
        assert got["decode_counts"] == counts_one, (rank, got["decode_counts"], counts_one)
        err = (got["decode"] - dec_one).abs().max().item()
        assert err < 1e-4, (rank, "decode", err, decode_gap)


def test_sharded_heads_without_a_group_raise():
    """A rank holding a share of the heads with no process group to reduce over must not select
    on its own heads: NotImplementedError naming the feature and what to do."""
    import types

    import pytest

    from flexwalk.integrations.settings import process_group

    module = types.SimpleNamespace(config=types.SimpleNamespace(num_attention_heads=8))
    assert process_group(module, torch.zeros(1, 8, 4, 16)) is None  # every head: no TP
    with pytest.raises(NotImplementedError, match="tensor parallelism: this rank holds 4 of 8 query heads"):
        process_group(module, torch.zeros(1, 4, 4, 16))
    with pytest.raises(NotImplementedError, match="unequal head shares"):
        process_group(module, torch.zeros(1, 3, 4, 16))
    per_head = SketchWalkConfig(skip_decode=False, head_scoring="per_head")
    with pytest.raises(NotImplementedError, match="sparse decode.* under tensor parallelism with head_scoring='per_head'"):
        flexwalk.DecodeState(per_head, 0, batch=1, q_heads=4, k_heads=2, head_dim=16, scale=0.25, kv_tokens=64,
                             device="cpu", process_group=object())
