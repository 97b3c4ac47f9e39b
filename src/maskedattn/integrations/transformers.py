"""``maskedattn`` as an attention backend of Hugging Face ``transformers``.

Two lines make any causal LM that uses transformers' attention interface run our kernels::

    from maskedattn.integrations.transformers import register
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())

(or ``model.set_attn_implementation(register())`` on a loaded model).

:func:`register` adds two functions to transformers' registries under the name ``"maskedattn"``:

- a **mask function** (``AttentionMaskInterface``): transformers calls it once per forward and
  mask type with the sizes, offsets and a composed ``mask_function`` closure. Instead of
  evaluating that closure on a T x T grid (what ``sdpa_mask`` does), we read its parts
  (causal, sliding window, packed sequences) and the 2-D padding mask, and return a
  :class:`StructuredMask` holding one of our mask specs: ``Causal()``, ``SlidingWindow(w)``,
  ``Padding(lengths)`` for right padding, ``Documents(ids)`` for left padding and packed
  sequences. Closures we do not know (image-token overlays, chunked attention, custom
  functions) are evaluated densely, exactly as ``sdpa_mask`` would, and run as a dense mask;
- an **attention function** (``AttentionInterface``): takes the model's q, k, v (k and v not
  repeated for grouped-query attention), its scaling, Gemma 2's softcap and gpt-oss's
  attention sinks, and calls :func:`maskedattn.attention`. With ``output_attentions=True`` it
  also returns the probabilities, rebuilt from the kernel's log-sum-exp.

What we cannot compute exactly (dropout while training, a T5-style position bias, value heads
wider than query heads, devices other than CPU and CUDA) runs transformers' own SDPA (or eager,
where SDPA cannot serve the call) for that call, after a one-time warning saying why.

Key positions
-------------
transformers places query i at ``q_offset + i`` and key j at ``kv_offset + j``; our kernels align
the queries to the *end* of the keys. With a causal mask no query sees a key after the last
query, so the keys are cut to the first ``q_offset + Tq - kv_offset`` (a view, no copy): that
turns a static cache's preallocated buffer, or a sliding-window cache, into an end-aligned call.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._optional import require
from ..attention import Causal, Documents, Mask, Padding, SlidingWindow, attention
from ..attention.masks import as_rule
from ..attention.observe import watched

__all__ = ["NAME", "StructuredMask", "attention_forward", "attention_layers", "current_key_offset",
           "is_transformers_model", "mask_interface", "observed_probabilities", "probabilities",
           "register",
           "running_maskedattn"]

NAME = "maskedattn"

_warned: set[str] = set()
# For observers of the call in progress (viz.capture): the position of its key 0.
_key_offset: ContextVar[int] = ContextVar("maskedattn_hf_key_offset", default=0)


def register() -> str:
    """Register ``"maskedattn"`` in transformers' attention and mask interfaces; idempotent.

    Returns the name to pass as ``attn_implementation``.
    """
    require("transformers", "the transformers integration")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)
    return NAME


# -- the mask function -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StructuredMask:
    """What our mask function hands to our attention function, per forward and mask type.

    ``spec`` is in the coordinates of the call our attention function makes: ``keys`` keys
    (the first of the layer's ``kv_length``), the queries at the end of them. ``dense`` builds
    the mask transformers' SDPA would have had, for the calls that fall back to it.
    """

    spec: Mask | None
    keys: int
    kv_length: int
    sdpa_kwargs: dict[str, Any] = field(repr=False)

    # generate() builds the masks of compilable caches ahead of the forward and hands them to the
    # model as its attention_mask; transformers passes on 4-D masks as they are.
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the equivalent 4-D mask (B, 1, Tq, Tk), for code that asks."""
        kw = self.sdpa_kwargs
        return (kw["batch_size"], 1, kw["q_length"], self.kv_length)

    def dense(self) -> Tensor | None:
        """The boolean (B, 1, Tq, kv_length) mask of ``sdpa_mask``, or None for plain causal."""
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(**self.sdpa_kwargs)


def mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> StructuredMask | Tensor:
    """transformers' mask-interface entry: the mask as structure, or dense where it must be.

    Arguments are those of ``transformers.masking_utils.sdpa_mask``.
    """
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if isinstance(attention_mask, StructuredMask):
        return attention_mask  # built ahead by generate() for this very forward
    mask_function = mask_function or causal_mask_function
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    sdpa_kwargs = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        allow_is_causal_skip=False, use_vmap=kwargs.get("use_vmap", False),
        device=kwargs.get("device", "cpu"),
    )
    parts = _parts(mask_function)
    if parts is None or parts.get("remapped"):  # remapped positions only inside and_masks
        # A closure we cannot read: evaluate it as sdpa_mask does; it runs as a dense mask.
        return sdpa_mask(**sdpa_kwargs)
    causal = parts.get("causal", False)
    # Keys after the last query are hidden by a causal mask: keep only the keys up to it.
    keys = min(kv_length, q_offset + q_length - kv_offset) if causal else kv_length
    if keys < q_length:
        return sdpa_mask(**sdpa_kwargs)
    specs: list[Mask] = []
    if "window" in parts:
        specs.append(SlidingWindow(parts["window"]))
    elif causal:
        specs.append(Causal())
    if "documents" in parts:
        specs.append(Documents(parts["documents"]))
    if attention_mask is not None:
        visible = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        visible = visible[:, kv_offset : kv_offset + keys].to(torch.bool)
        padding = _padding_spec(visible)
        if padding is not None:
            specs.append(padding)
    spec = None
    for s in specs:
        spec = s if spec is None else spec & s
    return StructuredMask(spec, keys, kv_length, sdpa_kwargs)


def _padding_spec(visible: Tensor) -> Mask | None:
    """A (B, Tk) key-visibility mask as a spec: nothing, right padding, or two "documents".

    Left padding (and any other pattern) becomes ``Documents(visible)``: real tokens see only
    real keys, exactly as transformers' mask has it; a padding query sees the padding keys
    instead of nothing, which changes only the rows of padding tokens, whose outputs no real
    token ever reads.
    """
    if bool(visible.all()):
        return None
    lengths = visible.sum(-1)
    if bool((visible == (torch.arange(visible.shape[-1], device=visible.device) <
                         lengths[:, None])).all()):
        return Padding(lengths)
    return Documents(visible.to(torch.int64))


def _parts(fn: Callable) -> dict[str, Any] | None:
    """The primitives a composed transformers ``mask_function`` is made of, or None.

    Reads the closures of ``transformers.masking_utils`` (``and_masks``, the causal function,
    the sliding-window overlay, the packed-sequence functions); anything else is unknown.
    """
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        return {"causal": True}
    if fn is mu.bidirectional_mask_function:
        return {}
    if getattr(fn, "__module__", None) != mu.__name__ or fn.__closure__ is None:
        return None
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__),
                     strict=True))
    kind = fn.__qualname__.split(".<locals>")[0]
    if kind == "and_masks":
        merged: dict[str, Any] = {}
        for part in cells["mask_functions"]:
            sub = _parts(part)
            if sub is None or (set(sub) & set(merged)) - {"causal"}:
                return None
            merged.update(sub)
            merged["causal"] = merged.get("causal", False) or sub.get("causal", False)
        if "window" in merged and not merged["causal"]:
            return None  # a window without causality: not one of our specs
        if merged.pop("remapped", False) and "documents" not in merged:
            return None
        return merged
    if kind == "sliding_window_overlay":
        return {"window": int(cells["sliding_window"])}
    if kind == "packed_sequence_mask_function":
        return {"documents": cells["packed_sequence_mask"]}
    if kind == "remap_positions_for_packed_sequence":
        # Positions restart in each packed sequence; inside one sequence they step by 1, so
        # causal and window rules read the same on the remapped and the flat positions, as
        # long as the sequences are also kept apart (checked by the caller, and_masks).
        inner = _parts(cells["mask_function"])
        return None if inner is None else {**inner, "remapped": True}
    return None


# -- the attention function --------------------------------------------------------------------


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: StructuredMask | Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-interface entry: (B, Tq, Hq, D) output and optional weights.

    query (B, Hq, Tq, D), key and value (B, Hkv, Tk, D) as the model's attention module
    passes them.
    """
    reason = _why_fallback(module, query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"maskedattn: {reason}; this call runs transformers' own attention",
                          stacklevel=2)
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, kwargs)

    mask, bias, key, value = _lower(module, attention_mask, query, key, value, kwargs)
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    want_probs = _wants_attentions(kwargs)
    shift = attention_mask.sdpa_kwargs["kv_offset"] if isinstance(attention_mask, StructuredMask) \
        else 0
    token = _key_offset.set(shift)
    try:
        # Observers rebuild rows from the LSE, so they get it too.
        result = attention(query, key, value, mask, bias=bias, softcap=softcap, scale=scaling,
                           return_lse=sinks is not None or want_probs or watched())
    finally:
        _key_offset.reset(token)
    out, lse = result if isinstance(result, tuple) else (result, None)
    if sinks is not None:
        # A sink is one more logit in each head's softmax, with no value: the row's total
        # becomes logaddexp(lse, sink) and the output shrinks by exp(lse - total).
        total = torch.logaddexp(lse, sinks.float()[None, :, None])
        out = (out.float() * torch.exp(lse - total)[..., None]).to(out.dtype)
        lse = total
    weights = None
    if want_probs:
        weights = probabilities(query, key, mask, lse, bias=bias, softcap=softcap,
                                scale=scaling).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def _wants_attentions(kwargs: dict) -> bool:
    """Whether the model was asked for attention weights (``output_attentions=True``)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return isinstance(collected, dict) and "attentions" in collected


def _why_fallback(module, query, key, value, attention_mask, dropout, kwargs) -> str | None:
    """One sentence saying why this call cannot be ours, or None."""
    if dropout and module.training:
        return "attention dropout during training is not supported"
    if kwargs.get("position_bias") is not None:
        return "a position bias tensor (T5-style) is not supported"
    if query.device.type not in ("cpu", "cuda"):
        return f"tensors on {query.device.type} are not supported (CPU and CUDA only)"
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        return (f"query, key and value head sizes differ ({query.shape[-1]}, {key.shape[-1]},"
                f" {value.shape[-1]})")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return f"dtype {query.dtype} is not supported"
    if isinstance(attention_mask, StructuredMask):
        if key.shape[-2] != attention_mask.kv_length:
            return (f"the cache gave {key.shape[-2]} keys where the mask expected"
                    f" {attention_mask.kv_length}")
    elif attention_mask is not None and not isinstance(attention_mask, Tensor):
        return f"a {type(attention_mask).__name__} mask is not supported"
    elif isinstance(attention_mask, Tensor) and attention_mask.dim() != 4:
        return f"a {attention_mask.dim()}-D attention mask is not supported"
    sinks = kwargs.get("s_aux")
    if sinks is not None and tuple(sinks.shape) != (query.shape[1],):
        return f"attention sinks of shape {tuple(sinks.shape)} (not one per head)"
    return None


def _lower(module, attention_mask, query, key, value, kwargs):
    """(mask, bias, key, value) for :func:`attention` from what the model passed."""
    if isinstance(attention_mask, StructuredMask):
        n = attention_mask.keys
        return attention_mask.spec, None, key[:, :, :n], value[:, :, :n]
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        q_len = query.shape[-2]
        if not is_causal or q_len == 1:
            return None, None, key, value
        # SDPA's is_causal is aligned to the top left: query i sees keys <= i.
        return Causal(), None, key[:, :, :q_len], value[:, :, :q_len]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None, key, value
    # An additive float mask: very negative entries hide the key, the rest is a bias.
    visible = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    bias = attention_mask.masked_fill(~visible, 0.0)
    return visible, (None if not bool(bias.any()) else bias.to(query.dtype)), key, value


# Scores held at once by :func:`probabilities` (16 MB of float32).
_SCORE_BLOCK = 1 << 22


def probabilities(query: Tensor, key: Tensor, mask: Mask | Tensor | None, lse: Tensor, *,
                  bias: Tensor | None = None, softcap: float | None = None,
                  scale: float | None = None, rows: Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Attention probabilities rebuilt from the log-sum-exp: exp(s - lse), (B, Hq, R, Tk).

    ``rows`` (query rows, default all) chooses which rows; each costs O(Tk) memory. Keys and
    queries as :func:`maskedattn.attention` takes them; ``lse`` (B, Hq, Tq) as it returns it
    (with any sink already folded in). Computed in float32, returned in ``dtype``.
    """
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    scale = d**-0.5 if scale is None else scale
    rows = torch.arange(tq, device=query.device) if rows is None else rows.to(query.device)
    g = hq // hkv

    def grouped(x: Tensor) -> Tensor:  # (B, Hq, R, ...) -> (B * Hkv, G * R, ...)
        return x.unflatten(1, (hkv, g)).flatten(0, 1).flatten(1, 2)

    keys = key.float().flatten(0, 1).transpose(-1, -2)  # (B * Hkv, D, Tk)
    lse = lse.float()
    bias = None if bias is None else bias.float().expand(b, hq, tq, tk)
    rule = as_rule(mask).to(query.device).fit(b, hq, tq, tk)
    columns = torch.arange(tk, device=query.device)
    out = torch.empty(b, hq, len(rows), tk, dtype=dtype, device=query.device)
    # A few hundred rows at a time, so that the scores' passes run on a block that stays in
    # cache (each op is one parallel region: smaller blocks would cost more in barriers on a
    # busy machine than they save).
    step = max(1, _SCORE_BLOCK // max(1, b * hq * tk))
    for start in range(0, len(rows), step):
        r = rows[start:start + step]
        q = grouped(query[:, :, r].float())
        lse_r = grouped(lse[:, :, r, None])
        if softcap is None:  # s * scale - lse in one matmul
            s = torch.baddbmm(lse_r, q, keys, beta=-1.0, alpha=scale)
        else:
            s = torch.bmm(q, keys).mul_(scale / softcap).tanh_().mul_(softcap).sub_(lse_r)
        s = s.unflatten(1, (g, len(r))).unflatten(0, (b, hkv)).flatten(1, 2)  # (B, Hq, R, Tk)
        if bias is not None:
            s += bias[:, :, r]
        s.exp_().masked_fill_(~rule.block(r, columns, tk - tq), 0.0)
        out[:, :, start:start + step] = s
    return out


def _fallback(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """transformers' SDPA for this call (eager where SDPA has no softcap or sinks)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = attention_mask.dense() if isinstance(attention_mask, StructuredMask) else attention_mask
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if mask is None:
        mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool,
                          device=query.device).tril(key.shape[-2] - query.shape[-2])[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


# -- inspection: which modules are the layers, and running them through us ---------------------


def current_key_offset() -> int:
    """The position of key 0 in the attention call now running (0 outside of one)."""
    return _key_offset.get()


def observed_probabilities(event, rows: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The probabilities (B, Hq, R, Tk) of query ``rows`` of an observed call of ours, rebuilt
    from its LSE, in ``dtype``.

    With attention sinks the rows are over the tokens only (the kernel's LSE has no sink):
    each sums to 1, as attention maps do; the sink's share is ``sigmoid(sink - lse)``.
    """
    lse = event.lse
    call = event.call
    bias = call.bias if isinstance(call.bias, Tensor) else None
    return probabilities(event.q.detach(), event.k.detach(), call.rule, lse, bias=bias,
                         softcap=call.softcap, scale=call.scale, rows=rows, dtype=dtype)


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a ``transformers`` model (without importing transformers)."""
    config = getattr(model, "config", None)
    return isinstance(model, nn.Module) and hasattr(config, "_attn_implementation")


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each decoder layer of a transformers model, in order.

    transformers gives every attention module its ``layer_idx``; a model with as many of
    them as it has layers is one we can inspect.
    """
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if (isinstance(index, int) and type(module).__name__.endswith("Attention")
                and index not in found):
            found[index] = module
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    n = getattr(config, "num_hidden_layers", None)
    if not found or sorted(found) != list(range(len(found))) or (n is not None and len(found) != n):
        raise TypeError(f"cannot find the {n} attention layers of this {type(model).__name__}:"
                        f" found layer indices {sorted(found)}")
    return [found[i] for i in range(len(found))]


class running_maskedattn:
    """Context manager: ``model`` runs its attention through ``"maskedattn"`` inside the block,
    and its previous implementation after it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.previous: str | None = None

    def __enter__(self) -> nn.Module:
        self.previous = self.model.config._attn_implementation
        if self.previous != NAME:
            self.model.set_attn_implementation(register())
        return self.model

    def __exit__(self, *exc) -> None:
        if self.previous != NAME:
            self.model.set_attn_implementation(self.previous)
