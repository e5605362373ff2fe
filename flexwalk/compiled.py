"""torch.compile helpers: a function under a code object of its own.

Dynamo keeps compiled graphs, recompile counts and automatic-dynamic history per code object.
Functions that share one (closures of one definition) share that history: a second
configuration's constants would make the first one's shapes symbolic, and their recompiles add
up towards dynamo's limit.  `with_own_code` gives each such function a code object of its own.
"""

from __future__ import annotations

import types

_CODES: list = []  # every code object made here (kept alive; their count makes names unique)


def with_own_code(fn, prefix: str):
    """fn (closure and defaults kept) under a code object of its own, named `prefix`_N."""
    name = f"{prefix}_{len(_CODES)}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    _CODES.append(code)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
