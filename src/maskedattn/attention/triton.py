"""The GPU flash-attention backend, written in Triton: the default for CUDA tensors.

Forward and backward kernels with every mask, ALiBi, additive bias, softcap and grouped-query
attention, queries aligned to the end of the keys, and a split-key decode path for a few
queries against a long cache. The kernels live in :mod:`._triton_kernels`, imported only when
a call reaches this backend, so this module imports without Triton installed.

On CPU tensors the backend serves calls only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported): that is how the tests run the
very same kernels on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from . import ops
from .backend import AttentionCall
from .lowering import op_args

__all__ = ["run", "why_not"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def why_not(call: AttentionCall) -> str | None:
    """Why this backend cannot serve ``call``, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'maskedattn[gpu]')"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if call.device.type != "cuda" and not (interpreting and call.device.type == "cpu"):
        return (f"the Triton kernels run on CUDA tensors, got a {call.device.type} tensor"
                " (CPU tensors only under TRITON_INTERPRET=1)")
    if call.dtype not in _DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, got {call.dtype}"
    if call.device.type == "cpu" and call.dtype == torch.bfloat16:
        # tl.dot on bfloat16 tiles multiplies their raw 16-bit patterns as integers there:
        # outputs around 1e9, not an error
        return ("Triton's interpreter (TRITON_INTERPRET=1) cannot compute bfloat16; use"
                " float16 or float32 on the CPU, or a CUDA tensor")
    if call.head_dim > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got D={call.head_dim}"
    if (call.device.type == "cuda" and call.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(call.device) < (8, 0)):
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    if call.needs_grad and isinstance(call.bias, Tensor) and call.bias.requires_grad:
        return "the Triton kernels do not compute the gradient of a bias tensor"
    return None


def run(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor | None]:
    """Backend entry point: the ``maskedattn::triton_fwd`` operator (autograd through
    ``maskedattn::triton_bwd``)."""
    out, lse = ops.flash_forward("triton", q, k, v, op_args(call))
    return out, (lse if call.return_lse else None)
