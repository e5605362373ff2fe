"""Tiny random-weight causal LMs built offline from configs, for the transformers integration tests.

Every builder returns a fresh config; `build_model(name, attn)` seeds torch and instantiates the
model so two builds of the same name share weights exactly.  Hidden sizes are multiples of
the head count; head_dim is 16 everywhere (keeps the compiled flex kernels few).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 128
HEAD_DIM = 16
SEED = 1234


@dataclass(frozen=True)
class Arch:
    """One tiny architecture: how to build it and what its layers look like."""

    name: str
    make_config: Callable[[], Any]
    model_cls: str = ""  # attribute of `transformers`; "" -> AutoModelForCausalLM
    supports_sdpa: bool = True

    def config(self):
        """A fresh config object (callers may mutate it)."""
        return self.make_config()

    def layer_is_sliding(self) -> list[bool]:
        cfg = self.config()
        n = cfg.num_hidden_layers
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            return [t == "sliding_attention" for t in types[:n]]
        return [getattr(cfg, "sliding_window", None) is not None] * n


def _common(n_heads: int, n_kv: int, layers: int, **kw) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=n_heads * HEAD_DIM,
        intermediate_size=2 * n_heads * HEAD_DIM,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **kw,
    )


def _llama():
    return transformers.LlamaConfig(**_common(4, 2, 2, head_dim=HEAD_DIM))


def _smollm2():
    # SmolLM2-style: Llama with 9 query heads and 3 key/value heads (GQA 3).
    return transformers.LlamaConfig(**_common(9, 3, 2, head_dim=HEAD_DIM))


def _mistral():
    return transformers.MistralConfig(**_common(4, 4, 2, head_dim=HEAD_DIM, sliding_window=40))


def _qwen2():
    return transformers.Qwen2Config(**_common(9, 3, 3))


def _qwen3():
    return transformers.Qwen3Config(**_common(4, 2, 2, head_dim=HEAD_DIM))


def _phi3():
    return transformers.Phi3Config(**_common(6, 2, 2))


def _gemma2():
    return transformers.Gemma2Config(
        **_common(4, 2, 4, head_dim=HEAD_DIM),
        sliding_window=40,
        query_pre_attn_scalar=HEAD_DIM,
        attn_logit_softcapping=5.0,  # small so the cap really bites on these logits
        final_logit_softcapping=30.0,
    )


def _gemma3():
    return transformers.Gemma3TextConfig(
        **_common(4, 1, 4, head_dim=HEAD_DIM),
        sliding_window=40,
        query_pre_attn_scalar=HEAD_DIM,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )


def _granite():
    return transformers.GraniteConfig(
        **_common(4, 2, 2),
        embedding_multiplier=2.0,
        attention_multiplier=1.0 / HEAD_DIM,
        residual_multiplier=0.5,
        logits_scaling=2.0,
    )


def _olmo2():
    return transformers.Olmo2Config(**_common(4, 4, 2))


def _smollm3():
    # layer 1 has no RoPE (SmolLM3's NoPE layers)
    return transformers.SmolLM3Config(**_common(9, 3, 2), no_rope_layers=[1, 0])


def _starcoder2():
    return transformers.Starcoder2Config(**_common(4, 2, 2), sliding_window=None)


def _cohere():
    return transformers.CohereConfig(**_common(4, 2, 2), logit_scale=1.0)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("llama", _llama),
        Arch("smollm2", _smollm2),
        Arch("mistral", _mistral),
        Arch("qwen2", _qwen2),
        Arch("qwen3", _qwen3),
        Arch("phi3", _phi3),
        Arch("gemma2", _gemma2, supports_sdpa=False),
        Arch("gemma3", _gemma3, model_cls="Gemma3ForCausalLM"),
        Arch("granite", _granite),
        Arch("olmo2", _olmo2),
        Arch("smollm3", _smollm3),
        Arch("cohere", _cohere),
        Arch("starcoder2", _starcoder2),
    ]
}


def build_model(name: str, attn: str = "eager", dtype: torch.dtype = torch.float32, config=None):
    """Seeded instantiation: the same name gives the same weights every time."""
    arch = ARCHS[name]
    cfg = arch.config() if config is None else config
    torch.manual_seed(SEED)
    if arch.model_cls:
        model = getattr(transformers, arch.model_cls)._from_config(cfg, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    # Random-init std 0.02 makes attention nearly uniform; widen q/k so the selection matters.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(8.0)
    return model.to(dtype).eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
