"""Runs one vLLM engine (CPU) on token-id prompts and prints what it generated and flexwalk's
counters inside the engine, as one JSON line.  Used by tests/test_vllm_plugin.py, one engine per
process (vLLM keeps process-wide state).

    python tests/vllm_engine.py '{"model": DIR, "prompts": [[ids]], "max_tokens": 4, ...}'

Fields: model, prompts (or batches: a list of prompt lists, generated one after the other),
max_tokens, max_model_len, tensor_parallel_size (default 1), additional_config (vLLM's),
prefix_caching, prompt_logprobs (the first batch's), plugin (False: flexwalk's plugin is not
loaded: vLLM's own backend).
"""

import json
import os
import sys


def main(spec: dict) -> dict:
    if not spec.get("plugin", True):
        os.environ["VLLM_PLUGINS"] = ""  # no general plugin: vLLM's own CPU attention
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from flexwalk.integrations.vllm import WORKER_EXTENSION

    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=spec.get("max_model_len", 1024), max_num_seqs=8, seed=0,
              tensor_parallel_size=spec.get("tensor_parallel_size", 1),
              additional_config=spec.get("additional_config") or {},
              enable_prefix_caching=spec.get("prefix_caching", False),
              worker_extension_cls=WORKER_EXTENSION if spec.get("plugin", True) else "",
              gpu_memory_utilization=0.1, kv_cache_memory_bytes=256 << 20)
    plugin = spec.get("plugin", True)
    if plugin:
        llm.collective_rpc("flexwalk_reset_counters")
    result = {"tokens": [], "counters": [], "density": [], "prompt_logprobs": []}
    for i, batch in enumerate(spec.get("batches", [spec.get("prompts", [])])):
        logprobs = spec.get("prompt_logprobs", False) and i == 0  # the first batch only: no prefix-cache hit
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, detokenize=False,
                                prompt_logprobs=0 if logprobs else None)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        result["tokens"].append([list(o.outputs[0].token_ids) for o in outs])
        if logprobs:  # the log-probability of each prompt token after the first, as the prefill computed it
            result["prompt_logprobs"] = [[d[t].logprob for t, d in zip(p[1:], o.prompt_logprobs[1:])]
                                         for p, o in zip(batch, outs)]
    if plugin:
        result["counters"] = llm.collective_rpc("flexwalk_counters")
        result["density"] = llm.collective_rpc("flexwalk_density_report")
    return result


if __name__ == "__main__":
    out = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(out), flush=True)
