"""``attention()``: the one public entry point of the operation, and its backend registry."""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .backend import AttentionCall
from .masks import Alibi, Mask, as_rule
from .observe import notify, watched

__all__ = ["attention", "available_backends", "choose_backend", "register_backend"]


@dataclass(frozen=True)
class _Registered:
    name: str
    module: str  # imported on first use, so optional dependencies stay optional


_BACKENDS: dict[str, _Registered] = {}
# Preference of backend="auto" per device type: the first that can serve the call wins.
_AUTO_ORDER: dict[str, list[str]] = {}


@functools.cache
def _module(name: str) -> ModuleType:
    return importlib.import_module(_BACKENDS[name].module)


def register_backend(name: str, module: str, *, auto: dict[str, int] | None = None) -> None:
    """Register a backend module (see :mod:`maskedattn.attention.backend` for the contract).

    ``auto`` maps a device type to this backend's rank in ``backend="auto"`` (lower first).
    """
    _BACKENDS[name] = _Registered(name, module)
    _module.cache_clear()
    for device_type, rank in (auto or {}).items():
        order = [n for n in _AUTO_ORDER.get(device_type, []) if n != name]
        order.insert(rank, name)
        _AUTO_ORDER[device_type] = order


register_backend("reference", "maskedattn.attention.reference", auto={"cpu": 0, "cuda": 0})
register_backend("sdpa", "maskedattn.attention.sdpa", auto={"cpu": 0, "cuda": 0})
register_backend("triton", "maskedattn.attention.triton", auto={"cuda": 0})
register_backend("tiled", "maskedattn.attention.tiled", auto={"cpu": 0})


def available_backends() -> list[str]:
    """Names accepted by ``attention(backend=...)``, besides ``"auto"``."""
    return sorted(_BACKENDS)


def choose_backend(call: AttentionCall, backend: str = "auto") -> str:
    """The backend that will serve ``call``; raises ``ValueError`` saying why if none can."""
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(
                f"backend must be 'auto' or one of {available_backends()}, got {backend!r}"
            )
        reason = _module(backend).why_not(call)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot serve this call: {reason}")
        return backend
    order = [*_AUTO_ORDER.get(call.device.type, []), "reference"]
    for name in order:
        if _module(name).why_not(call) is None:
            return name
    raise AssertionError("the reference backend serves every call")  # pragma: no cover


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | Tensor | None = None,
    *,
    bias: Alibi | Tensor | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact scaled dot-product attention with a mask, on already-projected heads.

    Args:
        q: queries, (B, Hq, Tq, D).
        k: keys, (B, Hkv, Tk, D). Hq must be a multiple of Hkv (grouped-query attention:
            query head h reads key/value head h // (Hq / Hkv)).
        v: values, (B, Hkv, Tk, D).
        mask: which keys each query sees: a spec such as ``Causal()``,
            ``SlidingWindow(256) & Documents(ids)``, or a bool tensor broadcastable to
            (B, Hq, Tq, Tk), True where visible. ``None`` lets every query see every key.
        bias: added to the scaled scores: ``Alibi(slopes)`` or a float tensor broadcastable
            to (B, Hq, Tq, Tk).
        softcap: if given, scaled scores become ``softcap * tanh(s / softcap)`` (Gemma 2).
        scale: multiplies q·k; defaults to 1/sqrt(D).
        backend: ``"auto"`` (the fastest backend that supports the call) or a name from
            :func:`available_backends`.
        return_lse: also return the log-sum-exp of each row's masked scores, (B, Hq, Tq),
            float32 (float64 for float64 inputs); -inf for a row that sees no key.

    Queries are aligned to the end of the keys: query i sits at position Tk - Tq + i, so the
    same call serves training (Tq = Tk) and decoding with a KV cache (Tq < Tk)::

        keys      0 1 2 3 4 5 6 7
        queries             0 1 2     (Tq = 3 at positions 5, 6, 7)

    A row whose mask hides every key outputs zeros (and has zero, finite gradients). On CPU
    tensors a NaN in q, k or v makes exactly the rows that read it NaN: the query's own row,
    and every row whose mask lets it see that key. On CUDA the kernel's own arithmetic
    decides (see the README).

    Returns:
        the output (B, Hq, Tq, D) in the inputs' dtype, and the LSE if ``return_lse``.
    """
    call = _validate(q, k, v, mask, bias, softcap, scale, return_lse)
    name = choose_backend(call, backend)
    run = _module(name).run
    out, lse = run(q, k, v, call)
    if _may_hold_nan(q, out):
        # Rare: run again on inputs with their NaNs zeroed, then mark exactly the rows that
        # read one (see _isolate_nans).
        clean_q, clean_k, clean_v, nan_rows = _isolate_nans(q, k, v, call)
        if nan_rows is not None:
            out, lse = run(clean_q, clean_k, clean_v, call)
            out = out.masked_fill(nan_rows[..., None], float("nan"))
            if lse is not None:
                lse = lse.masked_fill(nan_rows, float("nan"))
    if watched():
        notify({"q": q, "k": k, "v": v, "call": call, "backend": name, "output": out,
                "lse": lse})
    if not return_lse:
        return out
    lse_dtype = torch.float64 if call.dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)


def _may_hold_nan(q: Tensor, out: Tensor) -> bool:
    """Whether a NaN may have reached the call: in q, or (through k or v) in the output.

    Sums are a cheap screen (a NaN anywhere makes them NaN) over tensors of the queries' size,
    not the keys': decoding against a long cache pays next to nothing. A NaN in k or v that a
    row reads makes that row's output NaN in every backend's arithmetic, so a clean output
    means no row read one. On the CPU only: on a GPU the answer would make the host wait for
    the device on every call, so there the kernels' own arithmetic decides (see the README).
    """
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(torch.isnan(q.sum() + out.sum()))


def _isolate_nans(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall):
    """Zero NaNs in q, k and v, and say which output rows must be NaN.

    Backends differ on NaN (0 * NaN leaks into rows that do not see a key; some kernels drop
    a NaN row's max and return zeros), so the rule is enforced here, once: a row is NaN when
    its query has a NaN or it may see a key whose k or v has one.
    Returns (q, k, v, rows) with rows (B, Hq, Tq) bool, or None when there is no NaN.
    """
    nan_q = torch.isnan(q).any(dim=-1)  # (B, Hq, Tq)
    nan_keys = torch.isnan(k).any(dim=-1) | torch.isnan(v).any(dim=-1)  # (B, Hkv, Tk)
    if not (nan_q.any() or nan_keys.any()):
        return q, k, v, None  # an overflow, or inf inputs: no NaN to isolate
    columns = nan_keys.any(dim=(0, 1)).nonzero().flatten()
    q_idx = torch.arange(call.q_len, device=q.device)
    visible = call.rule.block(q_idx, columns, call.offset)  # (Bm, Hm, Tq, n)
    nan_at = nan_keys[..., columns].repeat_interleave(call.group, dim=1)  # (B, Hq, n)
    rows = nan_q | (visible & nan_at[:, :, None, :]).any(dim=-1)
    q = q.masked_fill(nan_q[..., None], 0.0)
    k = k.masked_fill(nan_keys[..., None], 0.0)
    v = v.masked_fill(nan_keys[..., None], 0.0)
    return q, k, v, rows


def _validate(q, k, v, mask, bias, softcap, scale, return_lse) -> AttentionCall:
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

