"""What a training step will cost in memory, estimated before the first step is taken.

A run whose step cannot fit (``--context 99999`` on a laptop) would otherwise start, allocate
for minutes and die, or swap the machine to a halt. The estimate is coarse: float32 weights,
gradients and AdamW's two moments (16 bytes per parameter), the activations autograd keeps for
one micro-batch, and the logits with their softmax and gradient. Calibrated on one measurement
(tiny preset, 4 x 4096 tokens on CPU: a peak 1.0 GiB above the interpreter's own, estimated 1.0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..model import GPT, GPTConfig

__all__ = ["StepMemory", "available_bytes", "check_fits", "estimate"]

_GIB = 2**30
# Floats autograd keeps per token and layer, in units of C (the width), besides the MLP's hidden
# layer before and after its activation (2 * mlp_hidden): the norms' inputs and outputs, q, k, v,
# the attention output, residuals, projections' inputs and the backward's temporaries (measured,
# see above). Attention itself keeps O(T) (the log-sum-exp) in the tiled backends.
_PER_LAYER = 20
_PER_VOCAB = 4  # logits, their float32 copy, the softmax and its gradient


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step: state that lives all run, and one micro-batch's work."""

    state: int
    activations: int

    @property
    def total(self) -> int:
        """Both together: the peak of a step."""
        return self.state + self.activations

    def describe(self) -> str:
        """A short human-readable account."""
        return (f"about {self.total / _GIB:.1f} GiB per step ({self.state / _GIB:.1f} GiB of"
                f" weights, gradients and optimizer state, {self.activations / _GIB:.1f} GiB"
                " of activations)")


def estimate(model_config: GPTConfig, micro_batch: int, seq_len: int) -> StepMemory:
    """The memory of a step over ``micro_batch`` sequences of ``seq_len`` tokens (per process)."""
    with torch.device("meta"):  # counts parameters without allocating them
        params = sum(p.numel() for p in GPT(model_config).parameters())
    tokens = micro_batch * seq_len
    width = _PER_LAYER * model_config.n_embd + 2 * model_config.mlp_hidden
    activations = 4 * tokens * (model_config.n_layer * width + _PER_VOCAB * model_config.vocab_size)
    return StepMemory(state=16 * params, activations=activations)


def available_bytes() -> int | None:
    """Memory the system can give without swapping (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(model_config: GPTConfig, micro_batch: int, seq_len: int,
               device: torch.device) -> StepMemory:
    """Refuse (``ValueError``) a CPU step that needs more memory than the machine has free."""
    need = estimate(model_config, micro_batch, seq_len)
    free = available_bytes() if device.type == "cpu" else None
    if free is not None and need.total > free:
        raise ValueError(
            f"a training step of {micro_batch} x {seq_len} tokens needs {need.describe()}, but"
            f" only {free / _GIB:.1f} GiB of memory is free; use a shorter --seq-len or"
            " --context, a smaller --batch-size, more --grad-accum, or a smaller model"
        )
    return need
