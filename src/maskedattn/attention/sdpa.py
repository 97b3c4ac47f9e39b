"""PyTorch's ``scaled_dot_product_attention`` as a backend, and the competitor in benchmarks.

SDPA takes a boolean or additive mask and an ``is_causal`` flag whose diagonal is aligned to the
*start* of the keys, so it is used only when Tq == Tk; every other mask is materialised as a
dense (Bm, Hm, Tq, Tk) tensor. It has no softcap and does not return the log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import AttentionCall
from .masks import MaskRule, bias_block

__all__ = ["run", "why_not"]


def why_not(call: AttentionCall) -> str | None:
    """SDPA cannot soft-cap scores or return the log-sum-exp."""
    if call.softcap is not None:
        return "PyTorch's scaled_dot_product_attention cannot apply a softcap"
    if call.return_lse:
        return "PyTorch's scaled_dot_product_attention does not return the log-sum-exp"
    return None


def run(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, None]:
    """Translate the mask and bias into SDPA's arguments and call it."""
    attn_mask, is_causal = sdpa_mask(call)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=call.scale,
        enable_gqa=call.group > 1,
    )
    return out, None


def sdpa_mask(call: AttentionCall) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA: None and a flag where possible, else a dense tensor."""
    rule = call.rule
    if call.bias is None and rule.is_empty_rule:
        return None, False
    if call.bias is None and _is_plain_causal(rule) and call.q_len == call.k_len:
        return None, True
    q_idx = torch.arange(call.q_len, device=call.device)
    k_idx = torch.arange(call.k_len, device=call.device)
    visible = rule.block(q_idx, k_idx, call.offset)
    if call.bias is None:
        return visible, False
    bias = bias_block(call.bias, q_idx, k_idx, call.offset).to(call.dtype)
    return bias.masked_fill(~visible, float("-inf")), False


def _is_plain_causal(rule: MaskRule) -> bool:
    others = (rule.window, rule.prefix, rule.chunk, rule.lengths, rule.documents, rule.dense)
    return rule.causal and all(part is None for part in others)
