"""What each head writes towards the next-token prediction: direct logit attribution.

A head's output, through its slice of Wo, is a vector added to the residual stream. Its *direct*
effect on a logit is that vector pushed through the final norm and the unembedding, as if nothing
after the head read it (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits";
TransformerLens's ``logit_attrs``)::

    effect[l, h, t] = frozen_norm(o[l, h, t] · Wo[h]) · Wᵤ[target_t]

What is approximated: the final norm is not linear, so its scale (the standard deviation of the
residual for LayerNorm, its root-mean-square for RMSNorm) is frozen at its value on the full
residual stream at that position; centring and the gain are applied as they are linear, and the
norm's bias is left out (it belongs to no head). Indirect effects (a later layer reading the
head's output) are not counted: that is what ablation (:mod:`.ablate`) measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .steps import LayerSteps, ModelAdapter, adapter_for, model_steps

__all__ = ["HeadEffects", "PageExtras", "direct_logit_attribution", "head_writes", "page_extras"]


@dataclass(frozen=True)
class HeadEffects:
    """Direct effect of every head on the logit of each position's target token.

    ``effects`` (L, H, T) float64: in logit units; ``targets`` (T,) the token id whose logit is
    attributed at each position (by default the model's own top prediction).
    """

    layers: list[int]
    effects: Tensor
    targets: Tensor
    logits: Tensor  # (T, V) the model's real logits


def head_writes(steps: LayerSteps) -> Tensor:
    """(H, T, C): each head's output through its own rows of Wo, its write into the residual
    stream (they sum, with Wo's bias, to the layer's output)."""
    w = steps.weights
    d = w.head_dim
    o = steps.trace.output[0]  # (H, T, D)
    wo = w.wo.double().view(w.n_heads, d, -1)  # (H, D, C)
    return torch.einsum("htd,hdc->htc", o, wo)


def direct_logit_attribution(model: nn.Module | ModelAdapter, tokens: Sequence[int] | Tensor,
                             *, targets: Sequence[int] | Tensor | None = None) -> HeadEffects:
    """Each head's direct effect on the logit of ``targets`` (default: the model's top prediction
    at each position), in logit units; see the module docstring for what is approximated."""
    return _attribute(model, tokens, targets)[0]


@torch.no_grad()
def _attribute(model: nn.Module | ModelAdapter, tokens: Sequence[int] | Tensor,
               targets: Sequence[int] | Tensor | None) -> tuple[HeadEffects, list[LayerSteps]]:
    adapter = adapter_for(model)
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
    residual: list[Tensor] = []
    handle = adapter.final_residual().register_forward_pre_hook(
        lambda module, args: residual.append(args[0][0].detach()))
    try:
        steps, logits = model_steps(adapter, ids)
    finally:
        handle.remove()
    targets = logits.argmax(-1) if targets is None else torch.as_tensor(targets).reshape(-1)
    if targets.shape != (ids.shape[1],):
        raise ValueError(f"targets must hold one token id per position ({ids.shape[1]}), got"
                         f" shape {tuple(targets.shape)}")
    unembed = adapter.unembedding().double()[targets]  # (T, C)
    full = residual[-1].double()
    effects = []
    for s in steps:
        normed = adapter.frozen_final_norm(head_writes(s), full)  # (H, T, C)
        effects.append((normed * unembed).sum(-1))
    return HeadEffects([s.layer for s in steps], torch.stack(effects), targets, logits), steps

# Above this many numbers per tensor (L * H * T * D) the attention page leaves q and k out: a
# 12-layer, 12-head, 1024-token GPT-2 would need 36 MB for them.
MAX_QK_NUMBERS = 1 << 20


@dataclass(frozen=True)
class PageExtras:
    """What the attention page shows beyond the maps: the q and k behind every score, and each
    head's direct effect on the predicted token (:func:`page_extras` builds it).

    ``q`` and ``k`` (L, H, T, D) float32 after positions, k repeated per query head (grouped-
    query attention), or None when too large; ``effects`` (L, H, T) in logits;
    ``predicted`` the label of the model's top next token at each position.
    """

    layers: list[int]
    q: Tensor | None
    k: Tensor | None
    scale: float
    effects: Tensor
    predicted: list[str]


@torch.no_grad()
def page_extras(model: nn.Module | ModelAdapter, tokens: Sequence[int] | Tensor,
                label: Callable[[int], str]) -> PageExtras:
    """Run the model once on ``tokens`` and collect :class:`PageExtras` for every layer;
    ``label(token_id)`` names a predicted token."""
    effects, steps = _attribute(model, tokens, None)
    group = steps[0].weights.n_heads // steps[0].weights.n_kv_heads
    q = torch.stack([s.q for s in steps]).float()
    k = torch.stack([s.k.repeat_interleave(group, dim=0) for s in steps]).float()
    keep = q.numel() <= MAX_QK_NUMBERS
    return PageExtras([s.layer for s in steps], q if keep else None, k if keep else None,
                      steps[0].scale, effects.effects.float(),
                      [label(int(i)) for i in effects.targets.tolist()])
