"""The name under which transformers passes a KV cache into a model's forward and generate(), and
returns it in their outputs: `past_key_values` up to 5.23, `cache` from 5.24.  The old name still
works on 5.24 and later, with a deprecation warning on every call and every read; flexwalk's own
calls go through these helpers, which decide once from the installed transformers."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def cache_kwarg() -> str:
    """"cache" where transformers' model outputs carry the cache under that name, else "past_key_values"."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`cache` as the keyword argument of a model's forward or of generate(): `model(ids, **cache_kwargs(c))`."""
    return {cache_kwarg(): cache}


def returned_cache(out: Any) -> Any:
    """The cache a forward returned in `out`, read under the name that raises no deprecation warning."""
    return getattr(out, cache_kwarg())
