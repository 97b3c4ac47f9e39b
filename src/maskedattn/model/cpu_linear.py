"""A float32 linear layer for many rows on the CPU: oneDNN's matrix product instead of MKL's.

``F.linear`` in float32 on the CPU goes to MKL's ``sgemm``. On the AMD EPYC machines this
project is measured on, MKL's float32 products reach ~90 GFLOP/s per core, and oneDNN's
matmul primitive (shipped inside torch, reached as ``torch.ops.mkldnn._linear_pointwise``)
~100: about 10% more in the forward product and in the input gradient (numbers in
BENCHMARKS.md). The linear layers are two thirds of a small GPT's training step, so this is
worth a few percent of the whole step. The weight gradient stays with MKL (no faster there).

:func:`serves` says when :func:`linear` takes this path (CPU float32 without autocast, more
rows than the decode kernel of :mod:`maskedattn.model.gemv` handles, not under
``torch.compile`` or a ``torch.func`` transform); ``F.linear`` is its oracle in the tests.
Both are float32 products with float32 accumulation; only the summation order differs.
``MASKEDATTN_ONEDNN=0`` turns the path off.
"""

from __future__ import annotations

import os
from functools import cache

import torch
from torch import Tensor

__all__ = ["linear", "serves"]


@cache
def _available() -> bool:
    return (os.environ.get("MASKEDATTN_ONEDNN", "1") != "0"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def serves(x: Tensor, weight: Tensor, min_rows: int) -> bool:
    """True if :func:`linear` runs ``F.linear(x, weight, ...)`` through oneDNN.

    ``min_rows``: calls with at most this many rows are left to the caller (the GEMV kernel).
    """
    # Under torch.compile / torch.export this path steps aside first, before anything that
    # tracing could not follow; the compiler then sees F.linear.
    return (
        not torch.compiler.is_compiling()
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.is_cpu
        and weight.is_cpu
        and x.dim() >= 2
        and x.numel() > min_rows * weight.shape[1]
        and _available()
        and not torch.is_autocast_enabled("cpu")
        and not torch._C._are_functorch_transforms_active()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU tensors (see :func:`serves`), via oneDNN."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad:
        return _forward(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b; the backward is F.linear's: dx = dy W, dW = dy^T x, db = sum dy."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _forward(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # With create_graph (grad mode on here) autograd must see dx = dy W, so that a
            # double backward is right; else oneDNN reads weight.t() (K, N) in place.
            dx = grad.matmul(weight) if torch.is_grad_enabled() \
                else _forward(grad, weight.t(), None)
        grad2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = grad2.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad2.sum(0)
        return dx, dw, db
