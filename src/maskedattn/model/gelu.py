"""GELU on the CPU through a native kernel, in both forms: exact (erf) and GPT-2's tanh.

torch's CPU GELU evaluates tanh, or erf and (in the backward) a second exponential, with
general-purpose vector functions: on the machines this project is measured on, the tanh form
costs five times the exact one, and a GPT-2 block's GELU a few percent of a training step.
``csrc/gelu.c`` derives each form and its gradient from one exponential (numbers in
BENCHMARKS.md). :func:`gelu` uses it where it applies and is the faster (see :func:`serves`:
the tanh form everywhere, the exact form where the kernel is built with AVX-512) and
``F.gelu``, its readable twin and test oracle, everywhere else. Results agree with ``F.gelu``
to float32 rounding (relative error ~1e-7, as torch's own against float64); bfloat16 is
computed in float32 and rounded once, as torch does.

The kernel is compiled on first use and loaded by the package's one loader, as the GEMV's is;
``MASKEDATTN_NATIVE`` means what it means for the other kernels (``0``: off). Calls go through
the custom operators ``torch.ops.maskedattn.gelu`` and ``gelu_backward`` (autograd registered;
a double backward runs torch's differentiable ``gelu_backward``), which ``torch.compile`` keeps
too: inductor's own GELU, fused with its neighbours, made a compiled training step up to 9%
slower than the operators (BENCHMARKS.md), because its partitioner evaluates the GELU again
for the backward and its tanh is slow. Under ``torch.export`` and the ``torch.func`` transforms
:func:`gelu` is ``F.gelu``, so an exported program does not depend on this package.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .._cbuild import native_library

__all__ = ["MIN_NATIVE", "gelu", "native_backward", "native_forward", "native_status", "serves"]

#: Fewer elements than this (a decoding step's few rows) stay with ``F.gelu``: there the
#: operator's fixed cost exceeds what the kernel saves.
MIN_NATIVE = 1 << 16

_SOURCE = Path(__file__).with_name("csrc") / "gelu.c"
_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # DT_* of the C source
_FORMS = {"none": 0, "tanh": 1}


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate=approximate)``, through the native kernel when it serves ``x``."""
    if serves(x, approximate):
        return torch.ops.maskedattn.gelu(x, approximate)
    return F.gelu(x, approximate=approximate)


def serves(x: Tensor, approximate: str = "none") -> bool:
    """True if :func:`gelu` runs ``x`` through the native operators: a plain contiguous CPU
    tensor of float32 or bfloat16 with at least :data:`MIN_NATIVE` elements, not under
    ``torch.export`` or a ``torch.func`` transform, and a form for which the kernel is the
    faster in at least one pass (the operators hand the other to torch)."""
    return (
        x.numel() >= MIN_NATIVE  # first: it turns away every decoding call
        and type(x) is Tensor  # a subclass (DTensor, a tensor-parallel shard) keeps its own rules
        and x.dtype in _DTYPES
        and x.is_cpu
        and approximate in _FORMS
        and x.is_contiguous()
        and not torch.compiler.is_exporting()
        and not torch._C._are_functorch_transforms_active()
        and _any_native_pass(x.dtype, approximate)
    )


@torch.compiler.assume_constant_result  # torch.compile must not trace the library's loading
def _any_native_pass(dtype: torch.dtype, approximate: str) -> bool:
    return any(_native_passes(dtype, approximate))


def _native_passes(dtype: torch.dtype, approximate: str) -> tuple[bool, bool]:
    """Whether the kernel is the faster (forward, backward) for this dtype and form, as
    measured (BENCHMARKS.md): the tanh form always; the exact form with AVX-512 only, and
    its bfloat16 forward never (torch's is the faster there)."""
    lib = _library()
    if lib is None:
        return False, False
    if approximate == "tanh":
        return True, True
    wide = lib.gelu_lanes() >= 16
    return wide and dtype is torch.float32, wide


def native_status() -> str:
    """Where the native kernel comes from, or why ``F.gelu`` is used instead."""
    _library()
    return _status[0]


_status = ["not loaded yet"]
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SYMBOLS = {"gelu_forward": ([_P, _P, _I64, _INT, _INT, _INT], None),
            "gelu_backward": ([_P, _P, _P, _I64, _INT, _INT, _INT], None),
            "gelu_lanes": ([], _INT)}


@cache
def _library() -> ctypes.CDLL | None:
    lib, _status[0] = native_library(_SOURCE, _FLAGS, "gelu", _SYMBOLS, "torch.nn.functional.gelu")
    return lib


def native_forward(x: Tensor, approximate: str = "none") -> Tensor:
    """The kernel's GELU itself, no autograd: CPU float32 or bfloat16, any size or strides.

    Raises ``RuntimeError`` if the kernel is not available (see :func:`native_status`).
    """
    lib = _native(approximate, x)
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.gelu_forward(x.data_ptr(), y.data_ptr(), x.numel(), _DTYPES[x.dtype],
                     _FORMS[approximate], torch.get_num_threads())
    return y


def native_backward(grad: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    """The kernel's ``grad * gelu'(x)`` itself, as :func:`native_forward`."""
    lib = _native(approximate, grad, x)
    grad, x = grad.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    lib.gelu_backward(grad.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(),
                      _DTYPES[x.dtype], _FORMS[approximate], torch.get_num_threads())
    return dx


def _native(approximate: str, *tensors: Tensor) -> ctypes.CDLL:
    """The library, after checking the arguments of a call to it."""
    _check(approximate, *tensors)
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native GELU kernel is not available: {native_status()}")
    return lib


def _check(approximate: str, *tensors: Tensor) -> None:
    x = tensors[-1]
    if approximate not in _FORMS:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    for t in tensors:
        if t.dtype not in _DTYPES or not t.is_cpu or t.dtype != x.dtype or t.shape != x.shape:
            got = [(t.dtype, tuple(t.shape)) for t in tensors]
            raise ValueError("maskedattn::gelu takes CPU float32 or bfloat16 tensors of one"
                             f" shape and dtype, got {got}")


@torch.library.custom_op("maskedattn::gelu", mutates_args=(), device_types="cpu")
def _gelu(x: Tensor, approximate: str) -> Tensor:
    _check(approximate, x)
    if not _native_passes(x.dtype, approximate)[0]:
        return F.gelu(x, approximate=approximate)
    return native_forward(x, approximate)


@_gelu.register_fake
def _(x: Tensor, approximate: str) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("maskedattn::gelu_backward", mutates_args=(), device_types="cpu")
def _gelu_backward(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    _check(approximate, grad, x)
    if not _native_passes(x.dtype, approximate)[1]:
        return torch.ops.aten.gelu_backward(grad, x, approximate=approximate)
    return native_backward(grad, x, approximate)


@_gelu_backward.register_fake
def _(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # backward(create_graph=True): a differentiable gradient
        return torch.ops.aten.gelu_backward(grad, x, approximate=ctx.approximate), None
    return torch.ops.maskedattn.gelu_backward(grad.to(x.dtype), x, ctx.approximate), None


_gelu.register_autograd(_backward, setup_context=_setup_context)
