"""flexwalk: SketchWalk block-sparse attention on PyTorch FlexAttention.

    import flexwalk
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sketchwalk_flex")

Importing flexwalk registers "sketchwalk_flex" with transformers (when it is installed).
"""

from .config import PRESETS, SketchWalkConfig
from .decode.state import DecodeState
from .decode.step import sketchwalk_decode
from .kernels.dense import dense_attention
from .kernels.flex import dense_block_mask, selection_block_mask
from . import options  # the module, callable as a scope: `with flexwalk.options(prefill_kernel="flex"):`
from .options import Options, current_options
from .prefill import sketchwalk_attention
from .reference import eager_sketchwalk_attention, reference_attention, token_mask
from .selection.driver import sketchwalk_selection
from .selection.topk import BlockSelection, expected_density
from .selection.walk import WalkState
from .stats import counters, density_report, reset_counters
from .varlen import VarlenWalkState, sketchwalk_varlen_attention

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BlockSelection",
    "DecodeState",
    "Options",
    "SketchWalkConfig",
    "VarlenWalkState",
    "WalkState",
    "configure",
    "counters",
    "current_options",
    "decode_states",
    "dense_attention",
    "dense_block_mask",
    "density_report",
    "eager_sketchwalk_attention",
    "expected_density",
    "options",
    "reference_attention",
    "reset_counters",
    "reset_decode_state",
    "selection_block_mask",
    "sketchwalk_attention",
    "sketchwalk_decode",
    "sketchwalk_selection",
    "sketchwalk_varlen_attention",
    "token_mask",
]

try:  # transformers is optional for the functional API
    import transformers as _transformers  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without transformers
    def configure(*args, **kwargs):
        raise ImportError("flexwalk.configure needs transformers: pip install transformers")

    reset_decode_state = decode_states = configure
else:
    from .integrations.transformers import ATTN_IMPLEMENTATION, configure, decode_states, register, reset_decode_state

    register()
