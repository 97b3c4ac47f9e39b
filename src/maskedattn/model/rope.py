"""Rotary frequencies, and the rescalings long-context checkpoints apply to them.

Pair i of a head turns by ``position * inv_freq[i]`` with ``inv_freq[i] = base^(-2i/D)``
(:func:`~maskedattn.model.layers.rope_tables`). Checkpoints stretched past their training
length slow some pairs down, as ``transformers`` names them in ``rope_parameters``:

- ``linear`` (position interpolation, Chen et al. 2023): every pair by ``factor``;
- ``llama3`` (Llama 3.1): pairs whose wavelength exceeds ``original_max_position_embeddings /
  low_freq_factor`` by ``factor``, those shorter than ``... / high_freq_factor`` not at all, and
  a smooth blend in between.

Both change only the frequencies, so positions stay exact at any length. ``dynamic`` (NTK
scaling that changes with the length of each input) and ``yarn`` (which also rescales the
scores) are not implemented: loading such a checkpoint says so.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["SCALINGS", "check_scaling", "inv_freq"]

SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def check_scaling(scaling: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``scaling`` is a rope scaling we implement, complete."""
    if not isinstance(scaling, dict):
        raise ValueError(f"GPTConfig: rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in SCALINGS:
        raise ValueError(f"GPTConfig: rope_scaling rope_type must be one of {sorted(SCALINGS)},"
                         f" got {kind!r}")
    for key in SCALINGS[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"GPTConfig: rope_scaling {kind!r} needs a positive {key!r},"
                             f" got {value!r}")


def inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None,
             device: torch.device | None = None) -> Tensor:
    """The (D/2,) float32 rotary frequencies of each pair, rescaled as ``scaling`` says."""
    freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                    / head_dim)
    if scaling is None:
        return freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return freq / factor
    # llama3: by wavelength (positions per turn) against the original context.
    context = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelength = 2 * math.pi / freq
    slow = torch.where(wavelength > context / low, freq / factor, freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * slow / factor + smooth * slow
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, blended, slow)
