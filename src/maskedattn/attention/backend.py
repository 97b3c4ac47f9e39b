"""What every attention backend receives, and the contract it keeps.

A backend is a module with two functions:

- ``why_not(call: AttentionCall) -> str | None``: ``None`` when it can serve the call, otherwise
  one sentence saying why not (shown to users who ask for that backend by name).
- ``run(q, k, v, call: AttentionCall) -> (output, lse | None)``: output (B, Hq, Tq, D) in the
  inputs' dtype; lse (B, Hq, Tq) when ``call.return_lse``. Autograd must work through it.

Inputs reaching a backend are already validated by :func:`maskedattn.attention`, through
:func:`maskedattn.attention.lowering.lower_call` (public: benchmarks and tests build calls with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import Alibi, MaskRule

__all__ = ["AttentionCall"]


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """One validated call of :func:`maskedattn.attention`: sizes, mask, scores options."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    rule: MaskRule  # fitted to the call and on its device
    bias: Alibi | Tensor | None  # Tensor biases are expanded to (.., Tq, Tk)
    softcap: float | None
    scale: float
    return_lse: bool
    needs_grad: bool

    @property
    def offset(self) -> int:
        """Position of query row 0 among the keys (queries align to the end of the keys)."""
        return self.k_len - self.q_len

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.q_heads // self.kv_heads
