"""A float32 linear layer for many rows on the CPU: oneDNN's matrix product instead of MKL's.

``F.linear`` in float32 on the CPU goes to MKL's ``sgemm``. On the AMD EPYC machines this
project is measured on, MKL's float32 products reach ~90 GFLOP/s per core, and oneDNN's
matmul primitive (shipped inside torch, reached as ``torch.ops.mkldnn._linear_pointwise``)
~100: about 10% more in the forward product and in the input gradient (numbers in
BENCHMARKS.md). The linear layers are two thirds of a small GPT's training step, so this is
worth a few percent of the whole step. The weight gradient stays with MKL (no faster there).

:func:`serves` says when :func:`linear` takes this path (CPU float32 without autocast, more
rows than the decode kernel of :mod:`maskedattn.model.gemv` handles, not under ``torch.export``
or a ``torch.func`` transform); ``F.linear`` is its oracle in the tests. Both are float32
products with float32 accumulation; only the summation order differs.
``MASKEDATTN_ONEDNN=0`` turns the path off.

The product is the custom operator ``torch.ops.maskedattn.onednn_linear`` with its autograd
registered, so that ``torch.compile`` keeps it (inductor's own lowering of oneDNN's linear wants
prepacked weights, and its plain ``F.linear`` is MKL's again) and fuses what lies around it.
``torch.export`` sees ``F.linear`` instead: an exported program stays portable.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["linear", "serves"]


# Read once at import: a constant is what torch.compile can trace without a guard.
_AVAILABLE = (os.environ.get("MASKEDATTN_ONEDNN", "1") != "0"
              and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def serves(x: Tensor, weight: Tensor, min_rows: int) -> bool:
    """True if :func:`linear` runs ``F.linear(x, weight, ...)`` through oneDNN.

    ``min_rows``: calls with at most this many rows are left to the caller (the GEMV kernel).
    """
    return (
        x.numel() > min_rows * weight.shape[1]  # first: it turns away every decoding call
        and not torch.compiler.is_exporting()
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.is_cpu
        and weight.is_cpu
        and x.dim() >= 2
        and _AVAILABLE
        and not torch.is_autocast_enabled("cpu")
        and not torch._C._are_functorch_transforms_active()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU tensors (see :func:`serves`), via oneDNN."""
    return torch.ops.maskedattn.onednn_linear(x, weight, bias)


@torch.library.custom_op("maskedattn::onednn_linear", mutates_args=(), device_types="cpu")
def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """F.linear's backward: dx = dy W (oneDNN, reading W^T in place), dW = dy^T x, db = sum dy.
    Each is differentiable, so a double backward is right too."""
    x, weight = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.maskedattn.onednn_linear(grad, weight.t(), None)
    grad2 = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[1]:
        dw = grad2.t().mm(x.reshape(-1, x.shape[-1]))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = grad2.sum(0)
    return dx, dw, db


_onednn_linear.register_autograd(_backward, setup_context=_setup_context)
