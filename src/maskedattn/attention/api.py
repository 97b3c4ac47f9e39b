"""``attention()``: the one public entry point of the operation, and its backend registry."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .backend import AttentionCall
from .lowering import lower_call
from .masks import Alibi, Mask
from .observe import notify, watched

__all__ = ["AUTO_PREFERENCE", "AttentionPlan", "attention", "available_backends",
           "choose_backend", "register_backend"]


@dataclass(frozen=True)
class _Registered:
    name: str
    module: str  # imported on first use, so optional dependencies stay optional


_BACKENDS: dict[str, _Registered] = {}
_LOADED: dict[str, ModuleType] = {}  # a plain dict: torch.compile reads it without tracing imports

#: ``backend="auto"``: per device type, the backends in order of preference. The first whose
#: ``why_not(call)`` is None serves the call; the reference, last everywhere, serves every call.
AUTO_PREFERENCE: dict[str, list[str]] = {
    "cpu": ["tiled", "sdpa"],  # the native kernel beats SDPA on the CPU (BENCHMARKS.md)
    "cuda": ["triton", "sdpa"],
}


def _module(name: str) -> ModuleType:
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_BACKENDS[name].module)
    return module


def register_backend(name: str, module: str, *, auto: dict[str, int] | None = None) -> None:
    """Register a backend module (see :mod:`maskedattn.attention.backend` for the contract).

    ``auto`` maps a device type to this backend's place in :data:`AUTO_PREFERENCE` (0 first).
    """
    _BACKENDS[name] = _Registered(name, module)
    _LOADED.pop(name, None)
    for device_type, rank in (auto or {}).items():
        order = [n for n in AUTO_PREFERENCE.get(device_type, []) if n != name]
        order.insert(rank, name)
        AUTO_PREFERENCE[device_type] = order


for _name in ("reference", "sdpa", "tiled", "triton"):
    register_backend(_name, f"maskedattn.attention.{_name}")
    _module(_name)  # light modules (Triton itself is imported on first use): load them now


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
    order = [*AUTO_PREFERENCE.get(call.device.type, []), "reference"]
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
    if isinstance(q, Tensor) and torch.is_autocast_enabled(q.device.type):
        q, k, v, bias = _autocast(q.device.type, q, k, v, bias)
    call = lower_call(q, k, v, mask, bias=bias, softcap=softcap, scale=scale,
                      return_lse=return_lse)
    return _run(q, k, v, call, choose_backend(call, backend))


class AttentionPlan:
    """:func:`attention` with its mask and options fixed, for a run of calls alike: every layer
    of a model in one step.

    The first call is validated, lowered and given its backend as :func:`attention` does; a
    later call whose q, k and v have the same shapes, dtypes and devices, in the same gradient
    mode, reuses that lowering and backend, and any other call is planned afresh. On the CPU
    that saves about a quarter of the Python of a decoding call, of which GPT-2 makes 12 a token
    (BENCHMARKS.md). Under ``torch.compile``, ``torch.export``, the ``torch.func`` transforms
    and autocast, and for tensor subclasses, each call is :func:`attention` itself. Threads may
    share a plan: its state is replaced whole.

    >>> plan = AttentionPlan(Padding(lengths))
    >>> out = plan(q, k, v)  # what attention(q, k, v, Padding(lengths)) returns
    """

    def __init__(self, mask: Mask | Tensor | None = None, *, bias: Alibi | Tensor | None = None,
                 softcap: float | None = None, scale: float | None = None,
                 backend: str = "auto", return_lse: bool = False) -> None:
        self.mask = mask
        self.options = {"bias": bias, "softcap": softcap, "scale": scale, "return_lse": return_lse}
        self.backend = backend
        self._planned: tuple | None = None  # (key, call, backend name), replaced whole

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``attention(q, k, v, mask, ...)`` with the plan's mask and options."""
        device = q.device if type(q) is Tensor else None
        if (device is None or type(k) is not Tensor or type(v) is not Tensor
                or torch.compiler.is_compiling() or _in_functorch()
                or torch.is_autocast_enabled(device.type)):
            return attention(q, k, v, self.mask, backend=self.backend, **self.options)
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, device, k.device, v.device,
               torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        planned = self._planned
        if planned is None or planned[0] != key:
            call = lower_call(q, k, v, self.mask, **self.options)
            planned = self._planned = (key, call, choose_backend(call, self.backend))
        return _run(q, k, v, planned[1], planned[2])


def _run(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, name: str
         ) -> Tensor | tuple[Tensor, Tensor]:
    """Run a lowered call on backend ``name``; NaN rule, observers and the returned dtypes as
    :func:`attention` promises them."""
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
    if not torch.compiler.is_compiling() and watched():  # observers run eagerly only
        notify({"q": q, "k": k, "v": v, "call": call, "backend": name, "output": out,
                "lse": lse})
    if not call.return_lse:
        return out
    lse_dtype = torch.float64 if call.dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)


def _autocast(device_type: str, *tensors):
    """As autocast treats SDPA: floating tensors but float64 in the autocast dtype, so the
    output comes back in it (mixed input dtypes are cast rather than refused)."""
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
            and t.dtype != torch.float64 else t for t in tensors]


def _may_hold_nan(q: Tensor, out: Tensor) -> bool:
    """Whether a NaN may have reached the call: in q, or (through k or v) in the output.

    Sums are a cheap screen (a NaN anywhere makes them NaN) over tensors of the queries' size,
    not the keys': decoding against a long cache pays next to nothing. A NaN in k or v that a
    row reads makes that row's output NaN in every backend's arithmetic, so a clean output
    means no row read one. On the CPU only: on a GPU the answer would make the host wait for
    the device on every call, so there the kernels' own arithmetic decides (see the README).
    """
    if q.device.type != "cpu" or torch.compiler.is_compiling() or _in_functorch():
        return False
    return math.isnan(q.sum().item() + out.sum().item())  # floats: fewer torch calls


def _in_functorch() -> bool:
    # Under torch.vmap a tensor cannot become a Python bool: the screen steps aside under the
    # torch.func transforms (and under tracing, above), where the kernels' arithmetic decides.
    return torch._C._are_functorch_transforms_active()


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
