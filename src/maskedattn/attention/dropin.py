"""``scaled_dot_product_attention``: PyTorch's signature and semantics, our kernels behind it.

Change one import and keep every call::

    # was: from torch.nn.functional import scaled_dot_product_attention as sdpa
    from maskedattn import scaled_dot_product_attention as sdpa
    y = sdpa(q, k, v, attn_mask=mask, is_causal=False, scale=None, enable_gqa=True)

Semantics are those of :func:`torch.nn.functional.scaled_dot_product_attention`: inputs
(..., L, E) and (..., S, E) with any leading dimensions, a bool mask (True takes part) or a
float mask added to the scores, broadcast to (..., L, S); ``is_causal`` aligned to the *top
left* (query i sees keys 0..i, as ``torch.ones(L, S).tril()``), unlike :func:`attention`, whose
queries align to the end of the keys. Calls reach :func:`maskedattn.attention`, which picks the
backend; cheap structure in a dense mask is recognised first (a causal mask, a key-padding
mask), so it runs with tile skipping instead of densely. What our kernels do not serve goes to
PyTorch's function itself, unchanged: dropout, value heads wider than the keys', L > S,
mismatched leading dimensions or dtypes, a non-positive scale, and every call that SDPA refuses
(so its error messages stay the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .api import attention
from .masks import Causal, Mask, MaskRule

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention` (same arguments,
    same result); see the module docstring for what is handed to PyTorch's own function."""
    if not _servable(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa)
    lead = query.shape[:-3] if query.dim() >= 3 else ()
    q, k, v = (_four_d(t) for t in (query, key, value))
    (b, h, tq, _), tk = q.shape, k.shape[2]
    mask: Mask | MaskRule | None = None
    bias = None
    if is_causal:
        mask = Causal() if tq == tk else MaskRule(dense=_top_left_causal(tq, tk, q.device))
    elif attn_mask is not None:
        full = attn_mask.expand(*lead, h, tq, tk).reshape(b, h, tq, tk)
        if attn_mask.dtype == torch.bool:
            mask = _recognise(attn_mask, full, lead, tq, tk)
        else:
            bias = full
    out = attention(q, k, v, mask, bias=bias, scale=scale)
    return out.reshape(*query.shape[:-1], value.shape[-1])


def _servable(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether the call is one :func:`attention` computes exactly as SDPA does."""
    tensors = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
    if not all(isinstance(t, Tensor) for t in tensors) or dropout_p != 0.0:
        return False
    if q.dim() < 2 or not q.dim() == k.dim() == v.dim():
        return False
    if not q.dtype == k.dtype == v.dtype or not q.dtype.is_floating_point:
        return False
    if k.shape != v.shape or k.shape[-1] != q.shape[-1] or q.shape[:-3] != k.shape[:-3]:
        return False
    heads_q = q.shape[-3] if q.dim() >= 3 else 1
    heads_k = k.shape[-3] if k.dim() >= 3 else 1
    if heads_q != heads_k and not (enable_gqa and heads_q % heads_k == 0):
        return False
    tq, tk = q.shape[-2], k.shape[-2]
    if min(tq, tk, q.shape[-1], *q.shape[:-2]) < 1 or tq > tk:
        return False
    if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
        return False
    if attn_mask is not None:
        if is_causal or attn_mask.dim() > q.dim() or attn_mask.device != q.device:
            return False  # SDPA raises for the first; let it say so
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            return False
        want = (*q.shape[:-1], tk)
        got = (1,) * (len(want) - attn_mask.dim()) + tuple(attn_mask.shape)
        if any(g not in (1, w) for g, w in zip(got, want, strict=True)):
            return False
    return True


def _four_d(t: Tensor) -> Tensor:
    """(..., H, T, E) as (B, H, T, E), the leading dimensions flattened into B."""
    if t.dim() == 2:
        return t[None, None]
    return t.reshape(-1, *t.shape[-3:])


def _top_left_causal(tq: int, tk: int, device: torch.device) -> Tensor:
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril()[None, None]


def _recognise(attn_mask: Tensor, full: Tensor, lead: tuple[int, ...], tq: int, tk: int
               ) -> Mask | MaskRule:
    """A structured rule for a dense bool mask where that is cheap to see, else the mask.

    A causal mask (lower triangle) becomes ``Causal()`` and a key-padding mask (the same
    prefix of keys for every query and head of a batch row) becomes ``lengths``: both then
    skip tiles. Looking costs one pass over the mask (or its (B, S) key row); when traced
    (torch.compile, torch.export) the mask is used densely instead of looked at.
    """
    dense = MaskRule(dense=full)
    if torch.compiler.is_compiling():
        return dense
    tril = _top_left_causal(tq, tk, full.device)[0, 0]
    if (tq == tk and attn_mask.shape[-2:] == (tq, tk) and attn_mask.shape[:-2].numel() == 1
            and torch.equal(attn_mask.reshape(tq, tk), tril)):
        return Causal()
    if attn_mask.shape[-2] == 1 and (attn_mask.dim() < 3 or attn_mask.shape[-3] == 1):
        rows = full[:, 0, 0, :]  # (B, S): the keys each batch row sees
        lengths = rows.sum(-1)
        prefix = torch.arange(tk, device=rows.device)[None, :] < lengths[:, None]
        if torch.equal(rows, prefix):
            return MaskRule(lengths=lengths)
    return dense
