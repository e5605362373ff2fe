"""Tensor parallelism on two CUDA GPUs (NCCL): a Llama with the 8B attention shape loaded with
transformers' tp_plan="auto" gives one GPU's sketchwalk_flex logits in prefill and in sparse
decode steps, every rank keeping the same blocks.

    python -m pytest -q tests/gpu/test_gpu_tensor_parallel.py      # needs two CUDA GPUs (make test-gpu)

The model: 4 layers, hidden 4096, 32 query / 8 KV heads of 128 (each rank holds half), float32
(so that the tensor-parallel sums' other order stays far below the tolerance), random weights;
batch 2, the last row left-padded, 8192 tokens, block 128, density 0.2, one dense layer.  Skipped
with fewer than two GPUs.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexwalk
from flexwalk import SketchWalkConfig
from flexwalk.integrations.cache_kwarg import cache_kwargs, returned_cache

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

CFG = SketchWalkConfig(block_size=128, density=0.2, dense_below=0, dense_layers=1)
DECODE_CFG = CFG.replace(skip_decode=False, decode_dense_steps=0)  # every step selects
N, PAD, STEPS, LAYERS = 8192, 1000, 6, 4


def _prompt(vocab: int):
    ids = torch.randint(0, vocab, (2, N), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :PAD] = 0
    return ids, mask


def _run(model, device) -> dict:
    """Prefill logits (the positions real in both rows) and density per layer, then STEPS sparse decode steps on fixed tokens with a
    growing cache: their logits and the counters."""
    ids, mask = (t.to(device) for t in _prompt(model.config.vocab_size))
    forced = torch.randint(0, model.config.vocab_size, (2, STEPS), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    with torch.no_grad():
        flexwalk.configure(model, CFG)
        flexwalk.reset_counters()
        out["prefill"] = model(ids, attention_mask=mask).logits[:, PAD:].float().cpu()  # real in both rows
        out["density"] = flexwalk.density_report()
        out["prefill_counts"] = flexwalk.counters()
        flexwalk.configure(model, DECODE_CFG)
        flexwalk.reset_counters()
        flexwalk.reset_decode_state(model)
        o = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        steps = []
        for t in range(STEPS):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype, device=device)], dim=1)
            o = model(forced[:, t : t + 1], attention_mask=mask, **cache_kwargs(returned_cache(o)), use_cache=True)
            steps.append(o.logits[:, -1].float().cpu())
        out["decode"] = torch.stack(steps, 1)
        out["decode_counts"] = flexwalk.counters()
    return out


def _worker(rank: int, world: int, store: str, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, as docs/multi-gpu.md runs it
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from transformers import AutoModelForCausalLM

        try:  # transformers >= 5.17 takes the plan in a DistributedConfig
            from transformers import DistributedConfig

            kwargs = {"distributed_config": DistributedConfig(tp_plan="auto")}
        except ImportError:
            kwargs = {"tp_plan": "auto"}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
        assert getattr(model, "tp_size", None) == world
        torch.save(_run(model, torch.device("cuda", rank)), os.path.join(out_dir, f"tp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gpus_under_tp_plan_give_one_gpus_logits(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=2048, hidden_size=4096, intermediate_size=4096, num_hidden_layers=LAYERS,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=16384,
                       tie_word_embeddings=False)
    LlamaForCausalLM(conf).save_pretrained(tmp_path / "model")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "model"), str(tmp_path)), nprocs=2, join=True)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).cuda().eval()
    ref = _run(one, torch.device("cuda"))
    with torch.no_grad():
        ids, mask = _prompt(conf.vocab_size)
        one.set_attn_implementation("sdpa")
        dense = one(ids.cuda(), attention_mask=mask.cuda()).logits[:, PAD:].float().cpu()
    scale = max(1.0, ref["prefill"].abs().max().item())
    gap = (ref["prefill"] - dense).abs().max().item()
    assert gap > 1e-2 * scale, "the budget must be sparse enough for the comparison to mean anything"
    assert ref["prefill_counts"].get("sparse_prefill") == LAYERS - 1 and ref["decode_counts"].get("sparse_decode")
    for rank in range(2):
        got = torch.load(tmp_path / f"tp{rank}.pt")
        assert got["density"] == ref["density"], (rank, got["density"], ref["density"])
        assert got["prefill_counts"] == ref["prefill_counts"] and got["decode_counts"] == ref["decode_counts"], rank
        for key in ("prefill", "decode"):
            err = (got[key] - ref[key]).abs().max().item()
            # float32: the all-reduces change only the summation order (~1e-6 of the logits)
            assert err < 1e-3 * scale, (rank, key, err, gap)
