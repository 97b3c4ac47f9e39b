"""Record a model's attention probabilities without touching its code or its outputs.

    with capture_attention(model) as cap:
        model(tokens)
    maps = cap.maps(labels)            # AttentionMaps (L, H, T, T)

Every ``maskedattn.attention`` call inside the block is observed (:mod:`..attention.observe`);
forward hooks on each block's attention module say which layer is calling. Whatever backend ran,
the probabilities are recomputed from the call's q and k with the reference formula, for the
requested query rows only: a long input costs O(T) memory per captured row, never O(T²) unless
every row is asked for. Calls with a KV cache (generation) add their rows as they come, so a
``generate`` call captured end to end yields the map of prompt and generated tokens together.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from ..attention.observe import AttentionEvent, observe_attention
from ..attention.reference import attention_trace
from .maps import AttentionMaps

__all__ = ["capture_attention"]

_current_layer: ContextVar[int | None] = ContextVar("maskedattn_capture_layer", default=None)

# Above this many query rows per head, captured maps are stored in float16 (half the memory).
_HALF_ABOVE = 512


class capture_attention:
    """Context manager recording the attention probabilities of ``model``'s layers.

    Args:
        model: a :class:`~maskedattn.model.GPT` (anything with ``blocks[i].attn``), or a
            ``transformers`` causal LM: inside the block it runs its attention through the
            ``"maskedattn"`` backend (:mod:`maskedattn.integrations.transformers`).
        layers: which layers to record (default: all).
        heads: which query heads to record (default: all).
        rows: which query positions to record (default: all); for long inputs give a few.
        batch_index: which sequence of the batch to record.
    """

    def __init__(self, model: nn.Module, *, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None,
                 rows: Sequence[int] | Tensor | None = None, batch_index: int = 0) -> None:
        blocks = getattr(model, "blocks", None)
        if blocks is not None and all(hasattr(b, "attn") for b in blocks):
            self._attn = [b.attn for b in blocks]
            self._hf = False
        else:
            from ..integrations import transformers as hf

            if not hf.is_transformers_model(model):
                raise TypeError("capture_attention needs a model with blocks[i].attn (a GPT) or"
                                f" a transformers model, got {type(model).__name__}")
            self._attn = hf.attention_layers(model)
            self._hf = True
        n = len(self._attn)
        self.layers = list(range(n)) if layers is None else sorted(set(layers))
        if any(not 0 <= i < n for i in self.layers):
            raise ValueError(f"layers must lie in [0, {n}), got {list(layers)}")
        self.heads = None if heads is None else sorted({int(h) for h in heads})
        self.rows = None if rows is None else sorted({int(r) for r in rows})
        if self.rows is not None and (not self.rows or self.rows[0] < 0):
            raise ValueError(f"rows must be non-empty positions >= 0, got {list(rows)}")
        self.batch_index = batch_index
        self._model = model
        self._stack: ExitStack | None = None
        # layer -> the calls' (query positions (R,), probabilities (H, R, Tk)), in call order:
        # one block per call, not one tensor per row (a 1024-token prefill is 12 blocks, not
        # 12k rows to copy twice).
        self._recorded: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i in self.layers}

    def __enter__(self) -> capture_attention:
        stack = ExitStack()
        if self._hf:
            from ..integrations.transformers import running_maskedattn

            stack.enter_context(running_maskedattn(self._model))
        for i, attn in enumerate(self._attn):
            if i in self.layers:
                stack.callback(attn.register_forward_pre_hook(self._enter_layer(i)).remove)
                stack.callback(attn.register_forward_hook(self._leave_layer).remove)
        stack.enter_context(observe_attention(self._record))
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack = None

    def _enter_layer(self, index: int):
        def hook(module, args):
            module._maskedattn_capture_token = _current_layer.set(index)
        return hook

    @staticmethod
    def _leave_layer(module, args, output):
        _current_layer.reset(module._maskedattn_capture_token)

    @torch.no_grad()
    def _record(self, event: AttentionEvent) -> None:
        layer = _current_layer.get()
        if layer is None:
            return  # an attention call outside the model's layers
        call = event.call
        b = self.batch_index
        if not 0 <= b < call.batch:
            raise ValueError(f"batch_index {b} is outside the batch of {call.batch}")
        # Key 0 of the call sits at position `shift` (a transformers sliding-window cache keeps
        # only the last keys); ours always start at 0.
        shift = self._key_offset()
        positions = torch.arange(call.offset, call.k_len) + shift
        if self.rows is not None:
            positions = positions[torch.isin(positions, torch.tensor(self.rows))]
        if positions.numel() == 0:
            return
        rows = (positions - shift - call.offset).to(event.q.device)
        store = torch.float16 if call.k_len > _HALF_ABOVE else torch.float32
        if self._hf and event.lse is not None:  # through our transformers backend
            from ..integrations.transformers import observed_probabilities

            probs = observed_probabilities(event, rows, store)[b].cpu()  # (H, R, Tk), from the LSE
        else:
            trace = attention_trace(
                event.q.detach(), event.k.detach(), event.v.detach(), call.rule,
                bias=call.bias, softcap=call.softcap, scale=call.scale, rows=rows,
            )
            probs = trace.probs[b].to(store).cpu()  # (H, R, Tk)
        if self.heads is not None:
            if self.heads[-1] >= probs.shape[0] or self.heads[0] < 0:
                raise ValueError(f"heads must lie in [0, {probs.shape[0]}), got {self.heads}")
            probs = probs[self.heads]
        if shift:
            probs = torch.nn.functional.pad(probs, (shift, 0))
        self._recorded[layer].append((positions, probs))

    def _key_offset(self) -> int:
        if not self._hf:
            return 0
        from ..integrations.transformers import current_key_offset

        return current_key_offset()

    def maps(self, tokens: Sequence[str], *, token_ids: Sequence[int] | None = None,
             generated_from: int | None = None) -> AttentionMaps:
        """What was recorded, as :class:`AttentionMaps` over the T = len(tokens) tokens."""
        t = len(tokens)
        blocks = [b for rec in self._recorded.values() for b in rec]
        if not blocks:
            raise ValueError("nothing was captured: run the model inside the `with` block")
        positions = torch.cat([pos for pos, _ in blocks]).unique()  # sorted
        positions = positions[positions < t]
        heads = blocks[0][1].shape[0]
        dtype = torch.float16 if t > _HALF_ABOVE else torch.float32
        probs = torch.zeros(len(self.layers), heads, len(positions), t, dtype=dtype)
        for li, layer in enumerate(self.layers):
            seen = torch.zeros(len(positions), dtype=torch.bool)
            for pos, block in self._recorded[layer]:  # in call order: later rows replace
                keep = pos < t
                ri = torch.searchsorted(positions, pos[keep])
                width = min(block.shape[-1], t)
                probs[li, :, ri, :width] = block[:, keep, :width].to(dtype)
                seen[ri] = True
            if not seen.all():
                missing = int(positions[~seen][0])
                raise ValueError(f"layer {layer} has no row for position {missing}")
        positions = positions.tolist()
        full = positions == list(range(t))
        return AttentionMaps(
            probs, list(tokens), rows=None if full else torch.tensor(positions),
            layers=self.layers, heads=self.heads, generated_from=generated_from,
            token_ids=None if token_ids is None else list(token_ids),
        )
