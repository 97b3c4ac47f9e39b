"""The five steps of attention inside a real model, with its weights and its own inputs.

    steps = layer_steps(model, token_ids, layer=1)     # one layer, every head
    steps.x                 (T, C)  the layer's input, after its norm: what Wq, Wk, Wv see
    steps.q_raw, k_raw      (H, T, D) X·Wq (+ bias), before positions
    steps.trace             AttentionTrace of steps 2 to 5 on the rotated q, k (reference.py)
    steps.projected         (T, C)  the heads side by side, through Wo: the layer's output

The model runs once, unchanged; a forward pre-hook on each attention module records the input it
receives (the normed residual stream) and the positions it is given. The steps are then redone
in float64 from the module's weights, with :func:`~maskedattn.attention.reference.attention_trace`
doing steps 2 to 5, and they reproduce the module's output (a test holds it). Nothing here
re-derives attention.

Models are reached through an adapter (:class:`ModelAdapter`): it names, for each layer, the
weights in the textbook layout (X·W), the module whose input is the layer's X, how positions are
applied to q and k, and, for direct logit attribution and ablation, the output projection, the
final norm and the unembedding. :func:`adapter_for` picks one; our GPT's is built in, and other
model families add theirs with :func:`register_adapter`. ``transformers`` models of GPT-2's and
LLaMA's layouts have theirs in :mod:`.steps_hf`, imported only when one is handed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attention.masks import Causal, Mask
from ..attention.reference import AttentionTrace, attention_trace

__all__ = ["GPTAdapter", "LayerInput", "LayerSteps", "LayerWeights", "ModelAdapter",
           "adapter_for", "frozen_norm", "layer_steps", "model_steps", "register_adapter"]


@dataclass(frozen=True)
class LayerWeights:
    """One attention layer's parameters in the textbook layout: Q = X·Wq + bq, and so on.

    Shapes: wq (C, Hq*D); wk and wv (C, Hkv*D); wo (Hq*D, C). Biases are None when absent.
    """

    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    bq: Tensor | None
    bk: Tensor | None
    bv: Tensor | None
    bo: Tensor | None
    n_heads: int
    n_kv_heads: int
    scale: float | None = None  # None: 1/sqrt(D)

    @property
    def head_dim(self) -> int:
        """D, the width of one head."""
        return self.wq.shape[1] // self.n_heads


@dataclass(frozen=True)
class LayerInput:
    """What one attention layer received in a forward pass (batch row 0)."""

    x: Tensor  # (T, C) after the layer's norm
    positions: Callable[[Tensor], Tensor] | None  # applies positions to q or k (1, H, T, D)
    mask: Mask | None


class ModelAdapter:
    """How the steps, the attribution and the ablation reach one model family.

    Subclasses implement every method; :class:`GPTAdapter` is the example.
    """

    #: How positions enter: "rope" (q and k rotated inside attention), "learned" (added to the
    #: token embeddings before the first layer) or "none".
    positions_kind: str = "none"

    def num_layers(self) -> int:
        """Attention layers in the model."""
        raise NotImplementedError

    def weights(self, layer: int) -> LayerWeights:
        """The layer's projections in the textbook layout."""
        raise NotImplementedError

    def run(self, tokens: Tensor, layers: Sequence[int]) -> tuple[dict[int, LayerInput], Tensor]:
        """Run the model on ``tokens`` (1, T): each layer's input, and the (T, V) logits."""
        raise NotImplementedError

    def out_proj(self, layer: int) -> nn.Module:
        """The module whose input is the concatenated heads (B, T, Hq*D): Wo."""
        raise NotImplementedError

    def final_residual(self) -> nn.Module:
        """The module whose input is the residual stream after the last layer (the final norm)."""
        raise NotImplementedError

    def frozen_final_norm(self, part: Tensor, full: Tensor) -> Tensor:
        """The final norm applied to ``part`` (..., C), a piece of the residual stream, with the
        norm's scale frozen at its value on ``full`` (..., C): linear in ``part``, so pieces add."""
        raise NotImplementedError

    def unembedding(self) -> Tensor:
        """(V, C): logits = normed residual · Wᵤᵀ."""
        raise NotImplementedError


class GPTAdapter(ModelAdapter):
    """:class:`~maskedattn.model.GPT`: fused qkv and proj linears, pre-norm blocks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.positions_kind = model.config.positions

    def num_layers(self) -> int:
        """Blocks in the model."""
        return len(self.model.blocks)

    def weights(self, layer: int) -> LayerWeights:
        """Split the fused qkv weight (nn.Linear stores W transposed: (out, in))."""
        attn = self.model.blocks[layer].attn
        c = self.model.config.n_embd
        kv = attn.n_kv_head * attn.head_dim
        w = attn.qkv.weight.detach().T
        b = attn.qkv.bias
        wq, wk, wv = w.split([c, kv, kv], dim=1)
        bq, bk, bv = (None, None, None) if b is None else b.detach().split([c, kv, kv])
        bo = attn.proj.bias
        return LayerWeights(wq, wk, wv, attn.proj.weight.detach().T, bq, bk, bv,
                            None if bo is None else bo.detach(), attn.n_head, attn.n_kv_head)

    def run(self, tokens: Tensor, layers: Sequence[int]) -> tuple[dict[int, LayerInput], Tensor]:
        """One forward pass with a pre-hook on each chosen layer's attention module."""
        from ..model.layers import apply_rope

        seen: dict[int, LayerInput] = {}

        def record(index: int):
            def hook(module, args):
                x, pos = args[0], args[1]
                rotate = None
                if pos.rope is not None:
                    cos, sin = (t[:1] for t in pos.rope)
                    # The model rotates in float32; so do we, then go back to the trace's dtype.
                    def rotate(t, cos=cos, sin=sin):
                        return apply_rope(t.float(), cos, sin).to(t.dtype)
                seen[index] = LayerInput(x[0].detach(), rotate, pos.mask)
            return hook

        with ExitStack() as stack, torch.no_grad():
            for i in layers:
                handle = self.model.blocks[i].attn.register_forward_pre_hook(record(i))
                stack.callback(handle.remove)
            logits = self.model(tokens).logits[0]
        return seen, logits

    def out_proj(self, layer: int) -> nn.Module:
        """``blocks[layer].attn.proj``."""
        return self.model.blocks[layer].attn.proj

    def final_residual(self) -> nn.Module:
        """``model.norm``."""
        return self.model.norm

    def frozen_final_norm(self, part: Tensor, full: Tensor) -> Tensor:
        """See :func:`frozen_norm`."""
        return frozen_norm(self.model.norm, part, full)

    def unembedding(self) -> Tensor:
        """``lm_head.weight``."""
        return self.model.lm_head.weight.detach()


def frozen_norm(norm: nn.Module, part: Tensor, full: Tensor) -> Tensor:
    """``norm`` applied to ``part`` with its scale frozen at its value on ``full``.

    LayerNorm: centre ``part`` (linear), divide by the standard deviation of ``full``, times the
    gain; the bias belongs to no piece. RMSNorm (anything else with a ``weight`` and an ``eps``
    or ``variance_epsilon``): divide by the root-mean-square of ``full``, times the gain.
    """
    full = full.double()
    gain = norm.weight.detach().double()
    if isinstance(norm, nn.LayerNorm):
        centred = part - part.mean(-1, keepdim=True)
        return centred / torch.sqrt(full.var(-1, unbiased=False, keepdim=True) + norm.eps) * gain
    eps = getattr(norm, "eps", None)
    eps = getattr(norm, "variance_epsilon", 1e-6) if eps is None else eps
    return part / torch.sqrt(full.pow(2).mean(-1, keepdim=True) + eps) * gain


def _transformers_adapter(model: nn.Module) -> ModelAdapter | None:
    if not type(model).__module__.startswith("transformers."):
        return None
    from .steps_hf import hf_adapter  # only when handed a transformers model

    return hf_adapter(model)


_ADAPTERS: list[Callable[[nn.Module], ModelAdapter | None]] = [
    lambda m: GPTAdapter(m) if hasattr(m, "blocks") and hasattr(m, "config")
    and hasattr(m.config, "positions") else None,
    _transformers_adapter,
]


def register_adapter(factory: Callable[[nn.Module], ModelAdapter | None]) -> None:
    """Teach :func:`adapter_for` a model family: ``factory(model)`` returns an adapter for the
    models it knows and None for the others. Later registrations are tried first."""
    _ADAPTERS.insert(0, factory)


def adapter_for(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """The adapter for ``model`` (an adapter passes through)."""
    if isinstance(model, ModelAdapter):
        return model
    for factory in _ADAPTERS:
        if (adapter := factory(model)) is not None:
            return adapter
    raise TypeError(f"no attention adapter knows a {type(model).__name__}: the steps, attribution"
                    " and ablation need a maskedattn GPT, a transformers GPT-2 or LLaMA-style"
                    " model, or register_adapter for yours")


@dataclass(frozen=True)
class LayerSteps:
    """The five steps of one layer on one sequence, every head, batch dimension dropped.

    Shapes: T tokens, C width, H query heads, D head width. ``trace`` is the reference trace of
    steps 2 to 5 (its tensors keep a leading batch dimension of 1).
    """

    layer: int
    weights: LayerWeights
    positions_kind: str  # "rope", "learned" or "none"
    x: Tensor  # (T, C) input after the layer's norm
    q_raw: Tensor  # (H, T, D) X·Wq + bq, before positions
    k_raw: Tensor  # (Hkv, T, D)
    v: Tensor  # (Hkv, T, D)
    q: Tensor  # (H, T, D) after positions (== q_raw without rope)
    k: Tensor  # (Hkv, T, D)
    trace: AttentionTrace
    concat: Tensor  # (T, H*D) heads side by side
    projected: Tensor  # (T, C) concat·Wo + bo: the layer's output

    @property
    def scale(self) -> float:
        """The factor the raw scores are multiplied by (1/√D unless the model says otherwise)."""
        return self.weights.scale or self.weights.head_dim ** -0.5


def model_steps(model: nn.Module | ModelAdapter, tokens: Sequence[int] | Tensor,
                layers: Sequence[int] | None = None) -> tuple[list[LayerSteps], Tensor]:
    """Run ``model`` once on ``tokens`` (T ids) and redo the steps of each chosen layer (default:
    all) in float64. Returns the steps and the model's (T, V) logits."""
    adapter = adapter_for(model)
    n = adapter.num_layers()
    layers = list(range(n)) if layers is None else list(layers)
    for i in layers:
        if not 0 <= i < n:
            raise ValueError(f"layer {i} is out of range: the model has {n} layers (0 .. {n - 1})")
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the text has no tokens")
    inputs, logits = adapter.run(ids, layers)
    return [_steps(i, adapter, inputs[i]) for i in layers], logits


def layer_steps(model: nn.Module | ModelAdapter, tokens: Sequence[int] | Tensor,
                layer: int) -> LayerSteps:
    """The steps of one layer: see :func:`model_steps`."""
    return model_steps(model, tokens, [layer])[0][0]


@torch.no_grad()
def _steps(layer: int, adapter: ModelAdapter, seen: LayerInput) -> LayerSteps:
    w = adapter.weights(layer)
    x = seen.x.double()
    t, d = x.shape[0], w.head_dim

    # Step 1: projections, then split the width into heads: (T, H*D) -> (H, T, D).
    def project(weight: Tensor, bias: Tensor | None, heads: int) -> Tensor:
        y = x @ weight.double() + (0 if bias is None else bias.double())
        return y.view(t, heads, d).transpose(0, 1)

    q_raw = project(w.wq, w.bq, w.n_heads)
    k_raw = project(w.wk, w.bk, w.n_kv_heads)
    v = project(w.wv, w.bv, w.n_kv_heads)
    # Step 1b: positions. RoPE turns q and k by angles that grow with the position, so q·k
    # depends on how far apart two tokens are; without it attention cannot tell order.
    q, k = q_raw, k_raw
    if seen.positions is not None:
        q, k = seen.positions(q_raw[None])[0], seen.positions(k_raw[None])[0]
    mask = seen.mask if seen.mask is not None else Causal()
    trace = attention_trace(q[None], k[None], v[None], mask, scale=w.scale)
    concat = trace.output[0].transpose(0, 1).reshape(t, w.n_heads * d)
    projected = concat @ w.wo.double() + (0 if w.bo is None else w.bo.double())
    return LayerSteps(layer, w, adapter.positions_kind, x, q_raw, k_raw, v, q, k, trace,
                      concat, projected)
