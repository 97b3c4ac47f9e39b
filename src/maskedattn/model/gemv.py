"""A linear layer for a few rows at a time: the native matrix-vector kernel of decoding.

Generating a token multiplies one activation row by every weight matrix of the model, so its
speed is how fast the weights stream from memory. On the CPU, ``torch.nn.functional.linear``
with one row reaches a fraction of that (measured in ``BENCHMARKS.md``); ``csrc/gemv.c`` streams
each weight once per call, on ``torch.get_num_threads()`` threads, and between calls its helper
threads warm the cache with the weights of the next few calls, as they followed the current
ones last time (a decode step calls them in the same order every token). :func:`linear` uses it
where it applies (CPU, float32 or bfloat16, at most :data:`MAX_ROWS` rows, no autograd) and
``F.linear``, its readable twin and test oracle, everywhere else.

The kernel is compiled on first use for this CPU (``-march=native``) and loaded by the
package's one loader (:func:`maskedattn._cbuild.load`, the attention kernel's too: verified
before loading, rebuilt when it does not verify). Without a compiler everything still works, at
torch's speed; :func:`native_status` says which path is in use and why. ``MASKEDATTN_NATIVE``
means what it means for the attention kernel: ``0`` turns it off, an instruction set's name
(``avx2``, ...) builds it for that set instead of this CPU's.

Under ``torch.compile`` the kernel is the custom operator ``torch.ops.maskedattn.gemv_linear``
(inference only, as the kernel is): a compiled decode step keeps it, where inductor's own
``F.linear`` would be MKL's, which streams a one-row product at a fraction of the speed.
``torch.export`` sees ``F.linear``.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .._cbuild import native_library

__all__ = ["MAX_ROWS", "linear", "native_linear", "native_status"]

MAX_ROWS = 4  # beyond this, a matrix-matrix product (reusing each weight) is faster
_SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
_FLAGS = ["-O3", "-pthread", "-shared", "-fPIC", "-std=c11"]
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through the native kernel when it serves the call."""
    # Decoding calls this ~50 times per token: the checks are ordered cheapest first and avoid
    # anything that allocates (``x.device`` alone costs more than all of them).
    if torch.compiler.is_compiling():  # traced: the operator, before the loader is touched
        if not torch.compiler.is_exporting() and _kernel_takes(x, weight, bias):
            return torch.ops.maskedattn.gemv_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    lib = _library()
    if (
        lib is not None
        and _kernel_takes(x, weight, bias)
        and x.is_contiguous()
        and weight.is_contiguous()
        and (bias is None or bias.is_contiguous())
    ):
        return _call(lib, x, weight, bias)
    return F.linear(x, weight, bias)


def native_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The native kernel itself: x (..., K) with at most MAX_ROWS rows, weight (N, K), bias (N,).

    No autograd; CPU float32 or bfloat16 only. Raises ``RuntimeError`` if the kernel is not
    available (see :func:`native_status`).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native GEMV kernel is not available: {native_status()}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight wants K={weight.shape[1]}")
    bias = None if bias is None else bias.contiguous()
    return _call(lib, x.contiguous(), weight.contiguous(), bias)


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _kernel_takes(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the kernel computes this call, strides aside (the operator copies what is not
    contiguous; eagerly, :func:`linear` leaves such calls to ``F.linear``)."""
    return (
        x.is_cpu
        and x.dtype in _NATIVE_DTYPES
        and weight.dtype is x.dtype
        and (bias is None or bias.dtype is x.dtype)
        and x.numel() <= MAX_ROWS * weight.shape[1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad)))
    )


@torch.library.custom_op("maskedattn::gemv_linear", mutates_args=(), device_types="cpu")
def _gemv_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if _library() is None:
        return F.linear(x, weight, bias)
    return native_linear(x, weight, bias)


@_gemv_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _call(lib: ctypes.CDLL, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run the kernel on contiguous CPU tensors of one dtype (float32 or bfloat16)."""
    n, k = weight.shape
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    args = (x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
            y.data_ptr(), x.numel() // k, n, k, torch.get_num_threads())
    if x.dtype is torch.float32:
        lib.gemv_f32(*args)
    elif lib.gemv_bf16(*args) != 0:
        raise MemoryError("the native GEMV kernel could not allocate its buffers")
    return y


def native_status() -> str:
    """Where the native kernel comes from, or why ``F.linear`` is used instead."""
    _library()
    return _status[0]


_status = ["not loaded yet"]


_SIGNATURE = ([_P, _P, _P, _P, _I64, _I64, _I64, _INT], None)
_SYMBOLS = {"gemv_f32": _SIGNATURE, "gemv_bf16": (_SIGNATURE[0], _INT)}


@cache
def _library() -> ctypes.CDLL | None:
    lib, _status[0] = native_library(_SOURCE, _FLAGS, "gemv", _SYMBOLS,
                                     "torch.nn.functional.linear")
    return lib
