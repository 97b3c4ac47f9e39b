"""How heads form: every head's role scores on a fixed probe, at every evaluation.

``maskedattn train --track-heads`` runs the model, at each evaluation, on the same few *probe*
sequences: random distinct tokens, then the same tokens again ([A B C ... A B C ...]). On such a
sequence every role of :mod:`maskedattn.viz.heads` has informative rows: an induction head looks,
from a token of the second copy, at the token after its first occurrence (Olsson et al. 2022's
prefix-matching score); a previous-token head at position i - 1. The probe is drawn once from
the run's seed, so the scores of step 100 and step 1000 are measured on the same tokens and can be
compared, and plotted against the step beside the loss (``heads.png``).

Each evaluation record of ``metrics.jsonl`` then holds ``"heads": {role: [[score per head] per
layer]}`` (null where a role has no informative row), the mean over the probe sequences.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PROBES", "probe_tokens", "track_heads"]

PROBES = 4  # sequences in the probe: enough that one unlucky draw does not decide a score


def probe_tokens(vocab_size: int, seq_len: int, seed: int, *, half: int | None = None,
                 count: int = PROBES) -> Tensor:
    """(count, 2n) long: ``count`` rows of n distinct random tokens followed by the same n again,
    with n = min(half or seq_len // 2, seq_len // 2, vocab_size). The same arguments give the
    same tokens.

    ``half`` keeps the repeat within what the model was trained on: a model trained on the
    induction task with segments of at most 16 tokens may not carry its heads to 18.
    """
    n = min(half or seq_len // 2, seq_len // 2, vocab_size)
    if n < 2:
        raise ValueError(f"tracking heads needs sequences of at least 4 tokens and a vocabulary"
                         f" of 2, got seq_len={seq_len}, vocab_size={vocab_size}")
    g = torch.Generator().manual_seed(seed + 2_000_029)  # apart from the data's generators
    half = torch.rand(count, vocab_size, generator=g).argsort(dim=-1)[:, :n]
    return torch.cat([half, half], dim=1)


@torch.no_grad()
def track_heads(model: nn.Module, probe: Tensor) -> dict[str, list[list[float | None]]]:
    """Every head's role scores on the ``probe`` rows (see :func:`probe_tokens`), averaged.

    Returns ``{role: L x H nested lists}``, rounded to 4 digits, None where no probe row was
    informative for that role. The model is left in the mode it was in.
    """
    from ..viz.capture import capture_attention
    from ..viz.heads import ROLES, head_scores

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_probe = {role: [] for role in ROLES}
    try:
        for row in probe:
            with capture_attention(model) as cap:
                model(row[None].to(device))
            ids = row.tolist()
            scores = head_scores(cap.maps([str(i) for i in ids], token_ids=ids))
            for role in ROLES:
                per_probe[role].append(scores.scores[role])
    finally:
        model.train(was_training)
    return {role: [[None if math.isnan(x) else round(x, 4) for x in layer]
                   for layer in torch.stack(per_probe[role]).nanmean(0).tolist()]
            for role in ROLES}
