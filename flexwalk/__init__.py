"""flexwalk: SketchWalk block-sparse attention on PyTorch FlexAttention.

    import flexwalk
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sketchwalk_flex")

Importing flexwalk registers "sketchwalk_flex" with transformers (when it is installed).
"""

from .attention import dense_attention, sketchwalk_attention
from .block_mask import dense_block_mask, selection_block_mask
from .config import PRESETS, SketchWalkConfig, expected_density
from .decode import DecodeState, sketchwalk_decode
from .oracle import eager_sketchwalk_attention, reference_attention, token_mask
from .selection import sketchwalk_selection
from .stats import counters, density_report, reset_counters
from .walk import BlockSelection, WalkState

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BlockSelection",
    "DecodeState",
    "SketchWalkConfig",
    "WalkState",
    "configure",
    "counters",
    "decode_states",
    "dense_attention",
    "dense_block_mask",
    "density_report",
    "eager_sketchwalk_attention",
    "expected_density",
    "reference_attention",
    "reset_counters",
    "reset_decode_state",
    "selection_block_mask",
    "sketchwalk_attention",
    "sketchwalk_decode",
    "sketchwalk_selection",
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
