"""Time to first token of the Llama-3.1-8B-shaped random model per prefill kernel, and where the time goes.

    PYTHONPATH=. python benchmarks/gpu_ttft_profile.py --out DIR [--lengths 32768,131072]
        [--kernels triton,flex] [--dense-layers 2] [--profile-length 131072]

For each length: sdpa, then sketchwalk_flex with each kernel of --kernels
(flexwalk.options.Options.prefill_kernel), one warm-up forward then two timed ones (the minimum
counts), logits of the last position only; block 128, density 0.2, dense_below 8192.  Then one
forward of each at --profile-length under torch.profiler: the CUDA kernels with the most total
time (DIR/profile_<impl>.txt), so the non-attention share can be compared kernel by kernel.
Writes DIR/gpu_ttft_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

import flexwalk
from flexwalk import SketchWalkConfig
from gpu_prefill import _prompt, env_info, log, time_prompts  # this folder is on sys.path as a script


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--kernels", default="triton,flex")
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--profile-length", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from transformers import AutoModelForCausalLM

    from gpu_decode import _llama8b_config

    res = {"env": env_info()}
    log(res["env"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(_llama8b_config(), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    sw = SketchWalkConfig(block_size=128, density=0.2, dense_below=8192, dense_layers=args.dense_layers)
    res["config"] = sw.to_dict()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    for kernel in args.kernels.split(","):
        flexwalk.options.set_options(prefill_kernel=kernel)
        out, _ = time_prompts(model, lengths, sw, reps=2, warmup=1)
        flexwalk.reset_counters()
        with torch.no_grad():
            flexwalk.configure(model, sw)
            model(_prompt(lengths[-1], model.config.vocab_size, "cuda"), use_cache=False, logits_to_keep=1)
        out["counters_last_length"] = flexwalk.counters()
        res[kernel] = out
        log(kernel, {k: v for k, v in out.items() if k.endswith("speedup")}, out["counters_last_length"])
        with open(os.path.join(args.out, "gpu_ttft_profile.json"), "w") as f:
            json.dump(res, f, indent=1)
    flexwalk.options.set_options(prefill_kernel="auto")
    if args.profile_length:
        ids = _prompt(args.profile_length, model.config.vocab_size, "cuda")
        for impl in ("sdpa", "sketchwalk_flex"):
            if impl == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                flexwalk.configure(model, sw)
            with torch.no_grad():
                model(ids, use_cache=False, logits_to_keep=1)  # warm
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    model(ids, use_cache=False, logits_to_keep=1)
                    torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
            with open(os.path.join(args.out, f"profile_{impl}.txt"), "w") as f:
                f.write(table)
            log(impl, "\n" + table)


if __name__ == "__main__":
    main()
