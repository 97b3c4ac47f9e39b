"""One call, lowered once: the flat bundle of ints, floats and tensors every kernel receives.

:func:`lower_call` validates the arguments of :func:`maskedattn.attention` and returns an
:class:`~maskedattn.attention.backend.AttentionCall` (sizes, the fitted :class:`MaskRule`, bias,
softcap, scale). :data:`OP_FIELDS` is that call's mask and scores as a flat list of named,
typed parameters: the one definition from which

- the schema of the ``torch.ops.maskedattn.*`` operators is written (:func:`op_schema`), so the
  mask travels through ``torch.compile`` and ``torch.export`` as plain ints, floats and
  optional tensors, with nothing data-dependent in Python;
- :func:`op_args` flattens a call and :func:`call_from_op_args` rebuilds it inside a kernel;
- the native kernel's argument struct is generated (:mod:`.native`; the C side checks its
  layout at load time), and the Triton kernels' mask parameters are named
  (``_triton_kernels.MASK_PARAMS``; every kernel's signature is checked against it at import).

Interval parameters use -1 for "absent" and 0.0 for "no softcap", so that every field has one
fixed type. The interval formulas themselves live once, in :meth:`MaskRule.classify` and
:meth:`MaskRule.block`; each kernel's mask code names the rule it mirrors.
"""

from __future__ import annotations

import math
from typing import NamedTuple, get_type_hints

import torch
from torch import Tensor

from .backend import AttentionCall
from .masks import Alibi, Mask, MaskRule, as_rule

__all__ = ["OP_FIELDS", "OpArgs", "call_from_op_args", "empty_like_heads", "lower_call", "op_args",
           "op_schema"]


class OpArgs(NamedTuple):
    """A call's mask and scores as operator arguments (the order of :data:`OP_FIELDS`)."""

    causal: bool  # k <= q
    window: int  # q - k < window; -1: none
    prefix: int  # k <= q or k < prefix; -1: none
    chunk: int  # q // chunk == k // chunk (ChunkedCausal); -1: none
    lengths: Tensor | None  # (B,) or (1,) int64: k < lengths[b]
    documents: Tensor | None  # (B, Tk) or (1, Tk) int64 ids: same id
    dense: Tensor | None  # bool (Bm, Hm, Tq, Tk), Bm, Hm in {1, B/Hq}
    alibi: Tensor | None  # float32 (Hq,) slopes
    bias: Tensor | None  # float (Bb, Hb, Tq, Tk)
    softcap: float  # 0.0: none
    scale: float


_SCHEMA_TYPES = {bool: "bool", int: "int", float: "float", Tensor | None: "Tensor?"}
#: (name, schema type) of every field, in order.
OP_FIELDS: tuple[tuple[str, str], ...] = tuple(
    (name, _SCHEMA_TYPES[kind]) for name, kind in get_type_hints(OpArgs).items()
)


def op_schema(tensors: str, returns: str) -> str:
    """An operator schema: ``tensors`` (e.g. ``"Tensor q, Tensor k"``), then every field."""
    fields = ", ".join(f"{kind} {name}" for name, kind in OP_FIELDS)
    return f"({tensors}, {fields}) -> {returns}"


def empty_like_heads(t: Tensor) -> Tensor:
    """An empty tensor of ``t``'s (B, H, T, D) shape, dtype and device, stored in ``t``'s order
    of heads and positions: the layout of every operator's outputs (out, dq, dk, dv).

    A model's q, k and v are (B, T, H, D) views of one projection, heads inner to positions; so
    stored, the output's reshape back to (B, T, C) is a view, and the gradients reach the
    projection's backward without a copy each (as SDPA's outputs do). Other inputs get
    contiguous outputs. The fakes allocate through this too, so traced strides match.
    """
    b, h, n, d = t.shape
    if h > 1 and n > 1 and t.stride(1) < t.stride(2):
        return t.new_empty((b, n, h, d)).transpose(1, 2)
    return t.new_empty((b, h, n, d))


def op_args(call: AttentionCall) -> OpArgs:
    """The flat operator arguments of a validated call."""
    rule = call.rule
    alibi = call.bias.slopes if isinstance(call.bias, Alibi) else None
    bias = call.bias if isinstance(call.bias, Tensor) else None
    return OpArgs(
        causal=rule.causal,
        window=-1 if rule.window is None else rule.window,
        prefix=-1 if rule.prefix is None else rule.prefix,
        chunk=-1 if rule.chunk is None else rule.chunk,
        lengths=rule.lengths, documents=rule.documents, dense=rule.dense,
        alibi=alibi, bias=bias,
        softcap=0.0 if call.softcap is None else float(call.softcap), scale=call.scale,
    )


def call_from_op_args(q: Tensor, k: Tensor, args: OpArgs, *, return_lse: bool = True
                      ) -> AttentionCall:
    """Rebuild the call inside an operator (real tensors: no validation needed again)."""
    a = OpArgs(*args)
    rule = MaskRule(
        causal=bool(a.causal),
        window=None if a.window < 0 else a.window,
        prefix=None if a.prefix < 0 else a.prefix,
        chunk=None if a.chunk < 0 else a.chunk,
        lengths=a.lengths, documents=a.documents, dense=a.dense,
    )
    bias = Alibi(a.alibi) if a.alibi is not None else a.bias
    b, hq, tq, d = q.shape
    return AttentionCall(
        batch=b, q_heads=hq, kv_heads=k.shape[1], q_len=tq, k_len=k.shape[2], head_dim=d,
        dtype=q.dtype, device=q.device, rule=rule, bias=bias,
        softcap=a.softcap if a.softcap > 0 else None, scale=a.scale, return_lse=return_lse,
        needs_grad=False,
    )


def lower_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | Tensor | None = None,
    *,
    bias: Alibi | Tensor | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> AttentionCall:
    """Validate the arguments of :func:`maskedattn.attention` and lower them to one call.

    Takes the same arguments (but ``backend``) and raises the same one-line ``ValueError`` /
    ``TypeError`` naming the argument at fault. Benchmarks and tests use it to drive a backend
    directly: ``backend_module.run(q, k, v, lower_call(q, k, v, Causal()))``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "(B, Hq, Tq, D)" if name == "q" else "(B, Hkv, Tk, D)"
            raise ValueError(
                f"{name} must have 4 dimensions {want}, got shape {tuple(t.shape)}"
                + (": add the batch and head dimensions, e.g. x[None, None]" if t.dim() < 4
                   else "")
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if not q.device == k.device == v.device:
        raise ValueError(
            f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}"
        )
    b, hq, tq, d = q.shape
    _, hkv, tk, _ = k.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, Hkv, Tk, D), got k {tuple(k.shape)} and"
            f" v {tuple(v.shape)}"
        )
    if k.shape[0] != b:
        raise ValueError(
            f"k must have the batch size of q, B={b}: wanted ({b}, Hkv, Tk, {d}),"
            f" got {tuple(k.shape)}"
        )
    if k.shape[3] != d:
        raise ValueError(
            f"k must have the head dimension of q, D={d}: wanted ({b}, Hkv, Tk, {d}),"
            f" got {tuple(k.shape)}"
        )
    if min(b, hq, hkv, d) < 1:
        raise ValueError(
            f"B, heads and D must be >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if tq < 1 or tk < 1:
        raise ValueError(
            f"sequence lengths must be >= 1, got Tq={tq} (q {tuple(q.shape)}) and Tk={tk}"
            f" (k {tuple(k.shape)})"
        )
    if hq % hkv:
        raise ValueError(
            f"q has Hq={hq} heads, which is not a multiple of the Hkv={hkv} heads of k and v;"
            f" use Hkv dividing Hq (grouped-query attention) or Hkv == Hq"
        )
    if tq > tk:
        raise ValueError(
            f"q has Tq={tq} positions but k has only Tk={tk}: queries are the last Tq of the"
            " Tk positions, so Tq must be <= Tk"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not _positive_number(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if softcap is not None and not _positive_number(softcap):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    rule = as_rule(mask)
    rule = rule.to(q.device).fit(b, hq, tq, tk)
    return AttentionCall(
        batch=b, q_heads=hq, kv_heads=hkv, q_len=tq, k_len=tk, head_dim=d, dtype=q.dtype,
        device=q.device, rule=rule, bias=_validate_bias(bias, q, tk), softcap=softcap,
        scale=float(scale), return_lse=bool(return_lse),
        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
    )


def _positive_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


def _validate_bias(bias, q: Tensor, tk: int) -> Alibi | Tensor | None:
    b, hq, tq, _ = q.shape
    if bias is None:
        return None
    if isinstance(bias, Alibi):
        if bias.slopes.shape[0] != hq:
            raise ValueError(
                f"bias: Alibi has {bias.slopes.shape[0]} slopes, wanted one per query head,"
                f" shape ({hq},)"
            )
        # in the precision the call computes in: float64 stays float64 (the reference, SDPA)
        precision = torch.float64 if q.dtype == torch.float64 else torch.float32
        return Alibi(bias.slopes.to(device=q.device, dtype=precision))
    if not isinstance(bias, Tensor):
        raise TypeError(
            f"bias must be None, Alibi(slopes) or a float tensor, got {type(bias).__name__}"
        )
    if not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    want = (b, hq, tq, tk)
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    if bias.dim() > 4 or any(g not in (1, w) for g, w in zip(shape, want, strict=True)):
        raise ValueError(
            f"bias has shape {tuple(bias.shape)}, which does not broadcast to (B, Hq, Tq, Tk)"
            f" = {want}"
        )
    if bias.device != q.device:
        raise ValueError(f"bias must be on the device of q, {q.device}, got {bias.device}")
    return bias.reshape(shape).expand(*shape[:2], tq, tk)
