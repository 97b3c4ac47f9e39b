"""The attention operation: masks, the reference, backends and the ``attention()`` entry point."""

from . import ops  # noqa: F401  (registers the torch.ops.maskedattn.* operators)
from .api import AttentionPlan, attention, available_backends, register_backend
from .dropin import scaled_dot_product_attention
from .lowering import lower_call
from .masks import (
    Alibi,
    Causal,
    ChunkedCausal,
    DenseMask,
    Documents,
    Mask,
    MaskRule,
    Padding,
    PrefixLM,
    SlidingWindow,
    TileKind,
)
from .reference import AttentionTrace, StepsTrace, attention_steps, reference_attention

__all__ = [
    "Alibi",
    "AttentionPlan",
    "AttentionTrace",
    "Causal",
    "ChunkedCausal",
    "DenseMask",
    "Documents",
    "Mask",
    "MaskRule",
    "Padding",
    "PrefixLM",
    "SlidingWindow",
    "StepsTrace",
    "TileKind",
    "attention",
    "attention_steps",
    "available_backends",
    "lower_call",
    "reference_attention",
    "register_backend",
    "scaled_dot_product_attention",
]
