"""maskedattn: masked self-attention you can read, inspect and run fast.

>>> import torch, maskedattn as ma
>>> q = k = v = torch.randn(1, 4, 16, 32)
>>> ma.attention(q, k, v, ma.Causal()).shape
torch.Size([1, 4, 16, 32])
"""

from .attention import (
    Alibi,
    AttentionPlan,
    AttentionTrace,
    Causal,
    ChunkedCausal,
    DenseMask,
    Documents,
    Mask,
    Padding,
    PrefixLM,
    SlidingWindow,
    StepsTrace,
    attention,
    attention_steps,
    available_backends,
    reference_attention,
    scaled_dot_product_attention,
)
from .generate import generate
from .model import GPT, GPTConfig

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "Alibi",
    "AttentionPlan",
    "AttentionTrace",
    "Causal",
    "ChunkedCausal",
    "DenseMask",
    "Documents",
    "GPTConfig",
    "Mask",
    "Padding",
    "PrefixLM",
    "SlidingWindow",
    "StepsTrace",
    "__version__",
    "attention",
    "attention_steps",
    "available_backends",
    "generate",
    "reference_attention",
    "scaled_dot_product_attention",
]
