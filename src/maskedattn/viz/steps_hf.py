"""Adapters that let the steps, the attribution and the ablation reach ``transformers`` models.

Two layouts are known, found by their modules rather than their class names, so relatives share
them: GPT-2's (``transformer.h[i].attn.c_attn``, a fused Conv1D already in the X·W layout, learned
positions) and LLaMA's (``model.layers[i].self_attn.{q,k,v,o}_proj``, rotary positions applied by
the model's own ``apply_rotary_pos_emb``, grouped-query attention; Mistral and Qwen2 share it).
Models that normalise q and k per head (Qwen3, OLMo 2) or scale their norms differently (Gemma)
are not covered: :func:`~.steps.adapter_for` then says so.

Imported only when :func:`~.steps.adapter_for` is handed a ``transformers`` model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import Tensor, nn

from .steps import LayerInput, LayerWeights, ModelAdapter, frozen_norm

__all__ = ["GPT2Adapter", "LlamaAdapter", "hf_adapter"]


class _HFAdapter(ModelAdapter):
    """What the two layouts share: a list of blocks, an attention module per block."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, attn_name: str,
                 final_norm: nn.Module) -> None:
        self.model, self._blocks, self._attn, self._norm = model, blocks, attn_name, final_norm

    def num_layers(self) -> int:
        """Decoder layers."""
        return len(self._blocks)

    def attention(self, layer: int) -> nn.Module:
        """The layer's attention module."""
        return getattr(self._blocks[layer], self._attn)

    def run(self, tokens: Tensor, layers: Sequence[int]) -> tuple[dict[int, LayerInput], Tensor]:
        """One forward pass; a pre-hook on each chosen attention module keeps its input."""
        seen: dict[int, LayerInput] = {}

        def record(index: int):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                seen[index] = LayerInput(x[0].detach(), self._positions(module, kwargs), None)
            return hook

        with ExitStack() as stack, torch.no_grad():
            for i in layers:
                handle = self.attention(i).register_forward_pre_hook(record(i), with_kwargs=True)
                stack.callback(handle.remove)
            logits = self.model(tokens).logits[0]
        return seen, logits

    def _positions(self, module: nn.Module, kwargs: dict):
        return None

    def final_residual(self) -> nn.Module:
        """The final norm."""
        return self._norm

    def frozen_final_norm(self, part: Tensor, full: Tensor) -> Tensor:
        """See :func:`~.steps.frozen_norm`."""
        return frozen_norm(self._norm, part, full)

    def unembedding(self) -> Tensor:
        """``lm_head.weight``."""
        return self.model.lm_head.weight.detach()


class GPT2Adapter(_HFAdapter):
    """``GPT2LMHeadModel``: Conv1D weights are stored (in, out), the X·W layout already."""

    positions_kind = "learned"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, model.transformer.h, "attn", model.transformer.ln_f)

    def weights(self, layer: int) -> LayerWeights:
        """Split ``c_attn`` into Wq, Wk, Wv; ``c_proj`` is Wo."""
        attn = self.attention(layer)
        w, b = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()
        c = w.shape[0]
        heads = attn.num_heads
        d = c // heads
        scale = (d ** -0.5 if attn.scale_attn_weights else 1.0) / (
            layer + 1 if attn.scale_attn_by_inverse_layer_idx else 1)
        return LayerWeights(*w.split(c, dim=1), attn.c_proj.weight.detach(), *b.split(c),
                            attn.c_proj.bias.detach(), heads, heads, scale)

    def out_proj(self, layer: int) -> nn.Module:
        """``c_proj``."""
        return self.attention(layer).c_proj


class LlamaAdapter(_HFAdapter):
    """``LlamaForCausalLM`` and its relatives: separate q, k, v, o projections, rotary positions."""

    positions_kind = "rope"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, model.model.layers, "self_attn", model.model.norm)

    def weights(self, layer: int) -> LayerWeights:
        """``nn.Linear`` stores W transposed: (out, in)."""
        attn = self.attention(layer)

        def bias(linear: nn.Linear) -> Tensor | None:
            return None if linear.bias is None else linear.bias.detach()

        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        d = attn.head_dim
        return LayerWeights(q.weight.detach().T, k.weight.detach().T, v.weight.detach().T,
                            o.weight.detach().T, bias(q), bias(k), bias(v), bias(o),
                            q.weight.shape[0] // d, k.weight.shape[0] // d, attn.scaling)

    def _positions(self, module: nn.Module, kwargs: dict):
        cos, sin = (t[:1] for t in kwargs["position_embeddings"])
        rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb

        def apply(t: Tensor) -> Tensor:
            return rotate(t, t, cos.to(t.dtype), sin.to(t.dtype))[0]
        return apply

    def out_proj(self, layer: int) -> nn.Module:
        """``o_proj``."""
        return self.attention(layer).o_proj


def hf_adapter(model: nn.Module) -> ModelAdapter | None:
    """The adapter for a ``transformers`` causal LM of a known layout, else None."""
    transformer = getattr(model, "transformer", None)
    if transformer is not None and hasattr(transformer, "h") \
            and hasattr(transformer.h[0].attn, "c_attn"):
        return GPT2Adapter(model)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None and hasattr(layers[0], "self_attn"):
        attn = layers[0].self_attn
        if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and not hasattr(attn, "q_norm") and "gemma" not in type(model).__module__:
            return LlamaAdapter(model)
    return None
