"""One evaluation batch, run in micro-batches, giving the numbers the whole batch would.

The validation loss must not depend on how the batch is cut (``--grad-accum``): per-token losses
of every micro-batch are gathered and summed once over the whole batch, so the result is the
same sum in the same order however many micro-batches there are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.tasks import IGNORE

__all__ = ["evaluate_batch"]


@torch.no_grad()
def evaluate_batch(forward: Callable[[tuple], object], tokens: Tensor, targets: Tensor,
                   documents: Tensor | None, micro: int, *, with_accuracy: bool
                   ) -> tuple[float, float | None]:
    """(mean loss over the scored targets, accuracy or None) of one batch (B, T).

    ``forward((tokens, targets, documents))`` runs the model on a slice of rows and returns
    its output (with ``logits``); slices hold at most ``micro`` rows.
    """
    token_losses, hits = [], 0
    for start in range(0, len(tokens), micro):
        rows = slice(start, start + micro)
        part = (tokens[rows], targets[rows], None if documents is None else documents[rows])
        logits = forward(part).logits
        wanted = part[1].to(logits.device)
        # The model's loss, per token (0 where ignored), instead of its mean over the part.
        token_losses.append(F.cross_entropy(logits.flatten(0, 1).float(), wanted.flatten(),
                                            ignore_index=IGNORE, reduction="none"))
        if with_accuracy:
            hits += int(((logits.argmax(-1) == wanted) & (wanted != IGNORE)).sum())
    scored = int((targets != IGNORE).sum())
    if scored == 0:
        raise ValueError("an evaluation batch has no scored target")
    loss = float(torch.cat(token_losses).sum(dtype=torch.float64) / scored)
    return loss, hits / scored if with_accuracy else None
