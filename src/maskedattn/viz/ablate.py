"""Switch heads off from outside the model and see what breaks: causal evidence for a head's role.

    with ablate_heads(model, [(1, 2)], how="zero"):
        loss = model(tokens, targets).loss       # as if layer 1 head 2 wrote nothing

A forward pre-hook on the layer's output projection (Wo) rewrites the head's slice of the
concatenated heads before Wo reads it, so the model's code and weights are untouched and the
hooks are gone when the block ends, like :class:`~.capture.capture_attention`.

- ``how="zero"``: the head's output becomes 0 (it writes nothing into the residual stream but
  Wo's bias).
- ``how="mean"``: the head's output becomes its mean over the batch and the positions of the same
  call, which keeps the average signal and removes what depends on the input (TransformerLens's
  mean ablation, with the call's own tokens as the reference set).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.tasks import IGNORE, accuracy
from .steps import ModelAdapter, adapter_for

__all__ = ["HOW", "HeadAblation", "ablate_heads", "ablation_table"]

HOW = ("zero", "mean")


def _check_heads(adapter: ModelAdapter, heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    n = adapter.num_layers()
    for pair in heads:
        try:
            layer, head = (int(v) for v in pair)
        except (TypeError, ValueError):
            raise TypeError(f"heads must be (layer, head) pairs, got {pair!r}") from None
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} is out of range: the model has {n} layers")
        n_heads = adapter.weights(layer).n_heads
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} is out of range: layer {layer} has {n_heads} heads")
        by_layer.setdefault(layer, []).append(head)
    return by_layer


@contextmanager
def ablate_heads(model: nn.Module | ModelAdapter, heads: Iterable[tuple[int, int]], *,
                 how: str = "zero") -> Iterator[None]:
    """Inside the block, the (layer, head) pairs in ``heads`` are ablated in every forward pass
    of ``model``: ``how`` is ``"zero"`` or ``"mean"`` (see the module docstring)."""
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    adapter = adapter_for(model)
    by_layer = _check_heads(adapter, heads)
    with ExitStack() as stack:
        for layer, chosen in by_layer.items():
            d = adapter.weights(layer).head_dim
            hook = _ablation_hook(chosen, d, how)
            stack.callback(adapter.out_proj(layer).register_forward_pre_hook(hook).remove)
        yield


def _ablation_hook(heads: list[int], d: int, how: str):
    def hook(module, args):
        x = args[0].clone()  # (B, T, H*D); never write into a tensor autograd may need
        for h in heads:
            part = x[..., h * d:(h + 1) * d]
            if how == "zero":
                part.zero_()
            else:
                part.copy_(part.mean(dim=tuple(range(part.dim() - 1)), keepdim=True)
                           .expand_as(part))
        return (x, *args[1:])
    return hook


@dataclass(frozen=True)
class HeadAblation:
    """Loss and accuracy with some heads ablated (``heads`` empty: the intact model)."""

    heads: tuple[tuple[int, int], ...]
    loss: float
    accuracy: float


@torch.no_grad()
def _evaluate(model: nn.Module, tokens: Tensor, targets: Tensor) -> tuple[float, float]:
    logits = model(tokens).logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).item()
    return loss, accuracy(logits, targets)


def ablation_table(model: nn.Module, tokens: Tensor, targets: Tensor, *,
                   heads: Sequence[tuple[int, int]] | None = None,
                   groups: Sequence[Sequence[tuple[int, int]]] = (), how: str = "zero",
                   ) -> list[HeadAblation]:
    """The intact model, then each head of ``heads`` (default: every head) ablated alone, then
    each group of ``groups`` ablated together, on ``tokens`` (B, T) scored at ``targets`` (B, T;
    -100 where unscored): next-token loss and top-1 accuracy."""
    adapter = adapter_for(model)
    if heads is None:
        heads = [(layer, h) for layer in range(adapter.num_layers())
                 for h in range(adapter.weights(layer).n_heads)]
    was_training = model.training
    model.eval()
    try:
        rows = [HeadAblation((), *_evaluate(model, tokens, targets))]
        for chosen in [[pair] for pair in heads] + [list(g) for g in groups]:
            with ablate_heads(adapter, chosen, how=how):
                rows.append(HeadAblation(tuple(tuple(p) for p in chosen),
                                         *_evaluate(model, tokens, targets)))
    finally:
        model.train(was_training)
    return rows
