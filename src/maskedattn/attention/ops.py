"""The kernels as PyTorch operators: ``torch.ops.maskedattn.*``.

Each fast kernel is a pair of ``torch.library`` operators, a forward and a backward:

=============================  ==========================================================
``maskedattn::tiled_fwd``      CPU kernel (native, else its pure-torch twin): (out, lse)
``maskedattn::tiled_bwd``      its backward: (dq, dk, dv)
``maskedattn::triton_fwd``     Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``)
``maskedattn::triton_bwd``     their backward
=============================  ==========================================================

Schemas: the forward takes ``(q, k, v, <OP_FIELDS>)`` and the backward
``(d_out, d_lse, q, k, v, out, lse, <OP_FIELDS>)``, where :data:`.lowering.OP_FIELDS` is the
call's mask and scores as ints, floats and optional tensors. Every operator has

- a fake (meta) implementation, so ``torch.compile`` and ``torch.export`` trace it without
  running it (the output shapes depend only on the input shapes);
- autograd: the forward's Autograd kernel applies an ``autograd.Function`` whose backward
  calls the backward operator (with ``setup_context`` under the ``torch.func`` transforms, so
  ``torch.func.grad`` works too); the public path (:func:`flash_forward`, which every backend
  calls) applies it directly; a second derivative raises a clear error, never a silent zero;
- a ``vmap`` rule that folds the mapped dimension into the batch;
- an autocast rule on the forwards that behaves like SDPA's: under ``torch.autocast`` the
  floating inputs are cast to the autocast dtype (float64 excepted) and the output comes back
  in it; the backwards take their inputs as the forward left them (lse stays float32).

``torch.library.opcheck`` passes on each (``tests/attention/test_ops.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._dynamo  # see below
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode

from .backend import AttentionCall
from .lowering import OP_FIELDS, OpArgs, call_from_op_args, empty_like_heads, op_schema

__all__ = ["FORWARD_OPS", "flash_backward", "flash_forward"]

# torch._dynamo is imported above, not by the first call of an operator made with torch's
# custom_op (the model's are; custom_op imports it then): imported after
# torch.distributed.init_process_group, it keeps the process group alive past
# destroy_process_group (torch 2.13), and the group's gloo threads then abort the process at
# interpreter exit.

_N = len(OP_FIELDS)
_MASK_TENSORS = tuple(i for i, (_, kind) in enumerate(OP_FIELDS) if kind == "Tensor?")
_FWD_SCHEMA = op_schema("Tensor q, Tensor k, Tensor v", "(Tensor, Tensor)")
_BWD_SCHEMA = op_schema(
    "Tensor d_out, Tensor? d_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse",
    "(Tensor, Tensor, Tensor)",
)


# -- the implementations ----------------------------------------------------------------------


def _tiled_forward(q: Tensor, k: Tensor, v: Tensor, *mask) -> tuple[Tensor, Tensor]:
    return _tiled_forward_call(q, k, v, call_from_op_args(q, k, OpArgs(*mask)))


def _tiled_forward_call(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall,
                        lse: bool = True) -> tuple[Tensor, Tensor | None]:
    from . import native, tiled

    kernel = native.kernel()
    if kernel is not None:
        return tiled.forward_native(kernel, q, k, v, call, lse=lse)
    return tiled.forward_torch(q, k, v, call)


def _tiled_backward(d_out, d_lse, q, k, v, out, lse, *mask) -> tuple[Tensor, Tensor, Tensor]:
    from . import native, tiled

    _check_lse(lse, d_lse)
    call = call_from_op_args(q, k, OpArgs(*mask))
    kernel = native.kernel()
    if kernel is not None:
        return tiled.backward_native(kernel, q, k, v, out, lse, d_out, d_lse, call)
    return tiled.backward_torch(q, k, v, out, lse, d_out, d_lse, call)


def _triton_forward(q: Tensor, k: Tensor, v: Tensor, *mask) -> tuple[Tensor, Tensor]:
    from . import _triton_kernels as tk

    return tk.forward(q, k, v, call_from_op_args(q, k, OpArgs(*mask)))


def _triton_backward(d_out, d_lse, q, k, v, out, lse, *mask) -> tuple[Tensor, Tensor, Tensor]:
    from . import _triton_kernels as tk

    _check_lse(lse, d_lse)
    return tk.backward(d_out, d_lse, q, k, v, out, lse, call_from_op_args(q, k, OpArgs(*mask)))


# -- fake implementations: shapes and dtypes only -----------------------------------------------


def _fake_forward(q: Tensor, k: Tensor, v: Tensor, *mask) -> tuple[Tensor, Tensor]:
    return empty_like_heads(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _fake_backward(d_out, d_lse, q, k, v, out, lse, *mask) -> tuple[Tensor, Tensor, Tensor]:
    _check_lse(lse, d_lse)
    return tuple(empty_like_heads(t) for t in (q, k, v))


def _check_lse(lse: Tensor, d_lse: Tensor | None) -> None:
    """The kernels read the log-sum-exp and its gradient as float32, whatever q's dtype."""
    for name, t in (("lse", lse), ("d_lse", d_lse)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"maskedattn: the backward's {name} must be float32 (as the forward"
                            f" returns it), got {t.dtype}. A torch.compile graph cached by an"
                            " earlier maskedattn passes bfloat16 here: clear inductor's cache"
                            " (docs/pytorch.md)")


# -- registration -------------------------------------------------------------------------------

# The operators are defined on the dispatcher directly (``Library.define`` and ``impl``), and
# their autograd is an ``autograd.Function`` (:class:`_Flash`) behind a kernel at the Autograd
# key: ``torch.library.custom_op``'s Python layers cost ~10 us a call without gradients and
# ~50 us with them (its ``fill_defaults`` is quadratic in a schema's arguments, and ours has
# 14), against ~8 us and ~15 us this way (BENCHMARKS.md).
_LIB = torch.library.Library("maskedattn", "FRAGMENT")


def _define(name: str, schema: str, impl: Callable, fake: Callable):
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"maskedattn::{name}", fake, lib=_LIB)
    return getattr(torch.ops.maskedattn, name).default


def _register(prefix: str, forward_impl: Callable, backward_impl: Callable):
    fwd = _define(f"{prefix}_fwd", _FWD_SCHEMA, forward_impl, _fake_forward)
    bwd = _define(f"{prefix}_bwd", _BWD_SCHEMA, backward_impl, _fake_backward)
    _LIB.impl(f"{prefix}_fwd", _differentiable(prefix, fwd), "Autograd")
    _LIB.impl(f"{prefix}_bwd", _first_order(bwd), "Autograd")
    torch.library.register_vmap(fwd, _vmap_rule(fwd, q_at=0, n_outputs=2), lib=_LIB)
    torch.library.register_vmap(bwd, _vmap_rule(bwd, q_at=2, n_outputs=3), lib=_LIB)
    # The forward only: the backward's inputs are what the forward saved and returned, already
    # in their dtypes, and its float32 lse must stay float32 when a backward runs inside an
    # autocast region (as torch.compile traces a training step's).
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _LIB.impl(f"{prefix}_fwd", _autocast_kernel(fwd, device_type), key)
    return fwd, bwd


def _needs_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(a, Tensor) and a.requires_grad for a in args)


def _differentiable(backend: str, op) -> Callable:
    """The forward's Autograd kernel: :class:`_Flash` when a gradient is wanted."""
    def kernel(*args):
        if _needs_grad(args):
            return _flash_apply(backend, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return kernel


def _first_order(op) -> Callable:
    """The backward's Autograd kernel: its gradients may not be differentiated again."""
    def kernel(*args):
        with torch._C._AutoDispatchBelowAutograd():
            grads = op(*args)
        if _needs_grad(args):
            grads = _FirstOrderOnly.apply(*grads, *(a for a in args if isinstance(a, Tensor)))
        return grads

    return kernel


_FIRST_ORDER_ONLY = (
    "maskedattn: attention supports first derivatives only, not double backward (a gradient"
    " of its gradient); use backend='reference' for higher derivatives"
)


def _autocast_kernel(op, device_type: str) -> Callable:
    """As autocast treats SDPA: floating inputs (float64 excepted) in the autocast dtype."""
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point()
                and a.dtype != torch.float64 else a for a in args]
        with torch.autocast(device_type, enabled=False):
            return op(*cast)

    return kernel


def _vmap_rule(op, q_at: int, n_outputs: int) -> Callable:
    """Fold the mapped dimension into the batch: (N, B, ...) becomes (N * B, ...).

    The per-batch mask tensors (lengths, documents, dense, bias) fold the same way; ALiBi
    slopes are per head, so a mapped ``alibi`` runs one call per mapped entry instead.
    """
    first_mask = q_at + (3 if q_at == 0 else 5)
    alibi_at = first_mask + OpArgs._fields.index("alibi")

    def rule(info, in_dims, *args):
        n = info.batch_size
        if in_dims[alibi_at] is not None:
            outs = [op(*(a.select(d, i) if d is not None else a
                         for a, d in zip(args, in_dims, strict=True))) for i in range(n)]
            return tuple(torch.stack(o) for o in zip(*outs, strict=True)), (0,) * n_outputs
        q, d = args[q_at], in_dims[q_at]
        batch = q.shape[0] if d is None else q.movedim(d, 0).shape[1]
        folded = []
        for i, (a, d) in enumerate(zip(args, in_dims, strict=True)):
            if not isinstance(a, Tensor) or i == alibi_at:
                folded.append(a)
                continue
            a = a.unsqueeze(0) if d is None else a.movedim(d, 0)
            a = a.expand(n, batch, *a.shape[2:])
            folded.append(a.reshape(n * batch, *a.shape[2:]))
        outs = op(*folded)
        return tuple(o.unflatten(0, (n, batch)) for o in outs), (0,) * n_outputs

    return rule


_tiled_fwd, _tiled_bwd = _register("tiled", _tiled_forward, _tiled_backward)
_triton_fwd, _triton_bwd = _register("triton", _triton_forward, _triton_backward)

#: backend name: its forward operator
FORWARD_OPS = {"tiled": _tiled_fwd, "triton": _triton_fwd}


def flash_forward(backend: str, q: Tensor, k: Tensor, v: Tensor, args: OpArgs,
                  call: AttentionCall | None = None) -> tuple[Tensor, Tensor | None]:
    """(out, lse) of ``backend``'s forward operator, differentiable through its backward.

    ``call``, if given, is the call that ``args`` were lowered from; in eager inference a call
    that does not ask for the LSE may get None for it (the native kernel then skips writing it;
    the pure-torch twin computes it anyway).
    """
    if backend == "tiled" and _plain_inference(q, k, v, *args):
        # Eager CPU inference (decoding calls this once per layer and token): the operator's
        # own implementation, without the dispatcher's tens of microseconds around it, on the
        # call itself rather than one rebuilt from its arguments.
        if call is None:
            call = call_from_op_args(q, k, args)
        return _tiled_forward_call(q, k, v, call, lse=call.return_lse)
    if not torch.compiler.is_compiling() and (torch._C._are_functorch_transforms_active()
                                              or _needs_grad((q, k, v, *args))):
        return _flash_apply(backend, q, k, v, *args)  # the operator's autograd, one hop less
    return FORWARD_OPS[backend](q, k, v, *args)


def _plain_inference(*args) -> bool:
    """No gradient, no tracing, no transform, mode or subclass that must see the operator."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active() or _dispatch_mode() is not None
            or torch.is_autocast_enabled("cpu")):
        return False
    grad = torch.is_grad_enabled()
    return all(type(a) is Tensor and not (grad and a.requires_grad)
               for a in args if isinstance(a, Tensor))


class _Flash(torch.autograd.Function):
    """The forward operators' autograd (their Autograd kernel applies it; eager calls apply it
    directly), with the ``setup_context`` that ``torch.func.grad`` needs. The forward and
    backward are the operators themselves, so ``torch.compile`` and ``torch.export`` see one
    opaque operator each way, and ``torch.vmap`` uses their vmap rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backend, q, k, v, *mask):
        with torch._C._AutoDispatchBelowAutograd():  # past the Autograd kernel, which is us
            return FORWARD_OPS[backend](q, k, v, *mask)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        backend, q, k, v, *mask = inputs
        out, lse = output
        ctx.backend, ctx.mask = backend, mask
        ctx.save_for_backward(q, k, v, out, lse, *(mask[i] for i in _MASK_TENSORS))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        mask = list(ctx.mask)
        for i, t in zip(_MASK_TENSORS, saved, strict=True):
            mask[i] = t
        if d_out is None:  # only the LSE was used
            d_out = torch.zeros_like(out)
        inputs = [t.detach() if t is not None else None for t in (d_out, d_lse, q, k, v)]
        grads = flash_backward(ctx.backend, *inputs, out.detach(), lse.detach(), OpArgs(*mask))
        if torch.is_grad_enabled():  # create_graph=True, or torch.func.grad
            grads = _FirstOrderOnly.apply(*grads, q, k, v, d_out)
        return None, *grads, *([None] * _N)


class _EagerFlash(torch.autograd.Function):
    """:class:`_Flash` without ``setup_context``, outside the functorch transforms: for a
    Function with one, ``apply`` binds the arguments through ``inspect.signature`` on every
    call (~15 us for these 15)."""

    @staticmethod
    def forward(ctx, backend, q, k, v, *mask):
        output = _Flash.forward(backend, q, k, v, *mask)
        _Flash.setup_context(ctx, (backend, q, k, v, *mask), output)
        return output

    backward = staticmethod(_Flash.backward)


def _flash_apply(backend: str, *args):
    """The forward operator's autograd, as the functorch transforms need it or as cheap."""
    if torch._C._are_functorch_transforms_active():
        return _Flash.apply(backend, *args)
    return _EagerFlash.apply(backend, *args)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes the gradients through, tied to the tensors they depend on, so that
    differentiating them again raises a clear error instead of giving a silent zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dq, dk, dv, *depends_on):
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_FIRST_ORDER_ONLY)


def flash_backward(backend: str, d_out: Tensor, d_lse: Tensor | None, q: Tensor, k: Tensor,
                   v: Tensor, out: Tensor, lse: Tensor, args: OpArgs
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``backend``'s backward operator."""
    op = _tiled_bwd if backend == "tiled" else _triton_bwd
    return op(d_out, d_lse, q, k, v, out, lse, *args)
