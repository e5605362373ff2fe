"""Time to first token under transformers tensor parallelism (issue 6), sdpa vs sketchwalk_flex.

One device call on a machine with two GPUs:

    PYTHONPATH=. python benchmarks/gpu_tp.py single --ckpt /tmp/l8b --out OUT
    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/gpu_tp.py tp --ckpt /tmp/l8b --out OUT

`single` builds the Llama-3.1-8B-shaped random-weight model on one GPU, times its TTFT at each
length (sdpa, then sketchwalk_flex), saves the last-position logits of the shortest length and
writes the checkpoint that `tp` loads with `DistributedConfig(tp_plan="auto")` on every rank.
`tp` times the same prompts on all ranks (rank 0 reports), checks that every rank kept the same
blocks (density per layer gathered from all ranks) and compares its logits with the single GPU's.
`--tiny` swaps in a 4-layer model for a CPU trial run (gloo, fp32).
Writes OUT/gpu_tp_single.json and OUT/gpu_tp_tp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flexwalk  # noqa: E402
from flexwalk import SketchWalkConfig  # noqa: E402
from flexwalk.integrations.cache_kwarg import cache_kwargs, returned_cache  # noqa: E402
from gpu_prefill import _prompt, _sync, env_info, time_prompts  # noqa: E402  (shared with the one-GPU TTFT)


def _config(tiny: bool):
    from transformers import LlamaConfig

    if not tiny:
        from gpu_decode import _llama8b_config

        return _llama8b_config()
    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=1000, max_position_embeddings=8192,
                       tie_word_embeddings=False)


def decode_run(model, n: int, steps: int, sw: SketchWalkConfig, rank0: bool = True, group=None):
    """Prefill n tokens, then `steps` one-token steps on fixed tokens with a growing cache,
    with dense decode steps (skip_decode=True) and with sparse ones: ms per step, the decode
    density per layer (gathered from every rank under TP) and the last step's logits."""
    device = model.device
    ids = _prompt(n, model.config.vocab_size, device)
    forced = _prompt(steps + 1, model.config.vocab_size, device)[:, 1:]
    out, logits = {}, {}
    for name, cfg in (("dense_decode", sw.replace(skip_decode=True)), ("sparse_decode", sw.replace(skip_decode=False))):
        flexwalk.configure(model, cfg)
        flexwalk.reset_counters()
        flexwalk.reset_decode_state(model)
        with torch.no_grad():
            o = model(ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            t0 = time.perf_counter()
            for t in range(steps):
                o = model(forced[:, t : t + 1], **cache_kwargs(returned_cache(o)), use_cache=True)
            _sync(device)
        rec = dict(ms_per_step=1e3 * (time.perf_counter() - t0) / steps, counters=flexwalk.counters())
        dens = {str(k): v for k, v in flexwalk.density_report("decode").items()}
        rec["decode_density_mean"] = sum(dens.values()) / len(dens) if dens else None
        if group is not None:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, dens)
            rec["ranks_agree"] = all(e == every[0] for e in every)
        rec["density_per_layer"] = dens
        out[name] = rec
        logits[name] = o.logits[:, -1].float().cpu()
        if rank0:
            print(f"decode after {n}: {name} {rec['ms_per_step']:.1f} ms/step, decode density "
                  f"{rec['decode_density_mean']}, ranks agree: {rec.get('ranks_agree')}", flush=True)
    model.set_attn_implementation("sdpa")
    return out, logits


def single(args, sw, lengths) -> None:
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    t = time.time()
    with device:
        model = AutoModelForCausalLM.from_config(_config(args.tiny), dtype=dtype, attn_implementation="sdpa").eval()
    print(f"built the model in {time.time() - t:.0f} s", flush=True)
    t = time.time()
    model.save_pretrained(args.ckpt)
    print(f"saved the checkpoint in {time.time() - t:.0f} s", flush=True)
    res, logits = time_prompts(model, lengths, sw, args.reps)
    saved = {k: v for k, v in logits.items() if lengths and k.startswith(f"{lengths[0]}/")}
    dec = None
    if args.decode_length:
        dec, dl = decode_run(model, args.decode_length, args.decode_steps, sw)
        saved.update({f"decode/{k}": v for k, v in dl.items()})
    torch.save(saved, os.path.join(args.out, "single_logits.pt"))
    with open(os.path.join(args.out, "gpu_tp_single.json"), "w") as f:
        json.dump({"env": env_info(), "config": sw.to_dict(), "lengths": lengths, "ttft": res, "decode": dec}, f, indent=1)


def tp(args, sw, lengths) -> None:
    from transformers import AutoModelForCausalLM

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        try:  # transformers >= 5.17 takes the plan in a DistributedConfig
            from transformers import DistributedConfig

            kwargs = {"distributed_config": DistributedConfig(tp_plan="auto")}
        except ImportError:
            kwargs = {"tp_plan": "auto"}
        t = time.time()
        model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16 if cuda else torch.float32,
                                                     **kwargs).eval()
        if rank == 0:
            print(f"loaded under tp_plan='auto' on {world} ranks in {time.time() - t:.0f} s (tp_size "
                  f"{getattr(model, 'tp_size', None)})", flush=True)
        res, logits = time_prompts(model, lengths, sw, args.reps, rank0=rank == 0, group=dist.group.WORLD) \
            if lengths else ({}, {})
        dec = None
        if args.decode_length:
            dec, dl = decode_run(model, args.decode_length, args.decode_steps, sw, rank == 0, dist.group.WORLD)
            logits.update({f"decode/{k}": v for k, v in dl.items()})
        if rank == 0:
            ref = torch.load(os.path.join(args.out, "single_logits.pt"))
            cmp = {}
            for key, one in ref.items():
                if key not in logits:
                    continue
                d = (logits[key] - one).abs().max().item()
                cmp[key] = dict(max_abs_diff_vs_single=d, argmax_equal=bool(logits[key].argmax() == one.argmax()))
            if lengths and f"{lengths[0]}/sdpa" in ref:
                n0 = lengths[0]
                cmp["single_sparse_vs_dense_max_abs"] = (ref[f"{n0}/sketchwalk_flex"] - ref[f"{n0}/sdpa"]).abs().max().item()
            if "decode/sparse_decode" in ref:
                cmp["single_sparse_vs_dense_decode_max_abs"] = (
                    ref["decode/sparse_decode"] - ref["decode/dense_decode"]).abs().max().item()
            print(f"logits, TP vs one GPU: {json.dumps(cmp)}", flush=True)
            with open(os.path.join(args.out, "gpu_tp_tp.json"), "w") as f:
                json.dump({"env": env_info(), "world": world, "config": sw.to_dict(), "lengths": lengths, "ttft": res,
                           "decode": dec, "logits_vs_single": cmp}, f, indent=1)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("single", "tp"))
    ap.add_argument("--ckpt", required=True, help="where `single` writes the random-weight checkpoint `tp` loads")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--reps", type=int, default=2, help="forwards per length and method; the minimum is reported")
    ap.add_argument("--dense-below", type=int, default=8192)
    ap.add_argument("--decode-length", type=int, default=0, help="also time decode steps after a prompt this long (0: no)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model for a CPU trial (gloo, fp32)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    block = 16 if args.tiny else 128
    sw = SketchWalkConfig(block_size=block, density=0.2, dense_below=args.dense_below)
    (single if args.stage == "single" else tp)(args, sw, lengths)


if __name__ == "__main__":
    main()
