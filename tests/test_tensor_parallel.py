"""Tensor parallelism, functional API: two gloo processes, each holding half of the heads, select
the same blocks as one process holding all of them, and their outputs are that process's."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexwalk
from flexwalk import SketchWalkConfig

HQ, HKV, N, D, LAYERS = 8, 4, 300, 16, 3
CONFIGS = {
    "mean": SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=0),
    "per_head": SketchWalkConfig(block_size=16, density=0.3, dense_below=0, dense_layers=0, head_scoring="per_head"),
}


def _inputs():
    g = torch.Generator().manual_seed(7)
    layers = [tuple(torch.randn(2, h, N, D, generator=g) for h in (HQ, HKV, HKV)) for _ in range(LAYERS)]
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1, :45] = False
    return layers, valid


def _run(layers, valid, cfg, group=None, heads=None):
    """Outputs and selection tables of LAYERS sparse layers, the walk carried across them."""
    outs, tables, state = [], [], None
    for i, (q, k, v) in enumerate(layers):
        if heads is not None:
            (q0, q1), (k0, k1) = heads
            q, k, v = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
        sel, _ = flexwalk.sketchwalk_selection(q, k, cfg, i, state, key_valid=valid, process_group=group)
        out, state = flexwalk.sketchwalk_attention(q, k, v, cfg, i, state, key_valid=valid, process_group=group)
        outs.append(out)
        tables.append(sel.mask)
    return outs, tables


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        layers, valid = _inputs()
        hq, hkv = HQ // world, HKV // world
        heads = ((rank * hq, (rank + 1) * hq), (rank * hkv, (rank + 1) * hkv))
        result = {name: _run(layers, valid, cfg, dist.group.WORLD, heads) for name, cfg in CONFIGS.items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    layers, valid = _inputs()
    real = valid[:, None, :, None]
    for name, cfg in CONFIGS.items():
        ref_outs, ref_tables = _run(layers, valid, cfg)
        for i in range(LAYERS):
            t0, t1 = ranks[0][name][1][i], ranks[1][name][1][i]
            assert torch.equal(t0, t1), f"{name} layer {i}: the ranks selected different blocks"
            assert torch.equal(t0, ref_tables[i]), f"{name} layer {i}: TP selection != single process"
            out = torch.cat([ranks[0][name][0][i], ranks[1][name][0][i]], dim=1)  # heads back together
            err = ((out - ref_outs[i]) * real).abs().max().item()
            assert err <= 1e-5, f"{name} layer {i}: TP output differs by {err:.3g}"
        assert any(not t.all() for t in ref_tables), "the budget must be sparse for the test to mean anything"
