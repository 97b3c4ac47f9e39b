"""A diverged run stops, and says so: no NaN hidden, no NaN weights written over good ones.

A step whose loss or gradient norm is not finite would poison the weights (AdamW turns one NaN
gradient into NaN everywhere). The loop checks both before ``optimizer.step()`` and every
parameter before a checkpoint is written, and raises :class:`TrainingDiverged` otherwise: the
checkpoints already on disk are the last good state.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .._errors import Failure

__all__ = ["TrainingDiverged", "check_step", "check_weights"]

_ADVICE = "lower --lr, raise --warmup, or clip harder with --grad-clip"


class TrainingDiverged(Failure):
    """The loss, a gradient or a weight stopped being a finite number."""


def check_step(step: int, loss: float, grad_norm: float, lr: float,
               last_checkpoint: Path | None) -> None:
    """Raise :class:`TrainingDiverged` unless ``loss`` and ``grad_norm`` are finite.

    ``step`` counts from 1 (the step that was about to be taken).
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None \
        else "no checkpoint was written"
    raise TrainingDiverged(
        f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm} at learning"
        f" rate {lr:.3g}; this step was not applied and {kept}; {_ADVICE}"
    )


@torch.no_grad()
def check_weights(model: nn.Module, step: int) -> None:
    """Raise :class:`TrainingDiverged` if any parameter holds a NaN or an infinity."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"training diverged at step {step}: {len(bad)} parameter tensor(s) hold NaN or"
            f" infinity (first: {bad[0]}); no checkpoint was written for it; {_ADVICE}"
        )
