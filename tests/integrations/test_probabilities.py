"""Probabilities rebuilt from the kernel's LSE equal a float64 softmax of the masked scores."""

from __future__ import annotations

import pytest
import torch

from maskedattn import attention
from maskedattn.attention.masks import Causal, Padding, SlidingWindow
from maskedattn.integrations import transformers as hf


def _softmax64(q, k, visible, *, scale, softcap, bias):
    """The textbook formula in float64, keys repeated for GQA."""
    g = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    return s.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)


@pytest.mark.parametrize("mask", ["causal", "window", "padding"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("block", [hf._SCORE_BLOCK, 1000])  # 1000: a block of one row or two
def test_rebuilt_rows_equal_float64_softmax(monkeypatch, mask, softcap, with_bias, block):
    monkeypatch.setattr(hf, "_SCORE_BLOCK", block)
    b, hq, hkv, t, d = 2, 6, 2, 113, 16
    q, k, v = (torch.randn(b, h, t, d) for h in (hq, hkv, hkv))
    pos = torch.arange(t)
    lengths = torch.tensor([t, 50])
    causal = pos[None, :] <= pos[:, None]
    rule, visible = {
        "causal": (Causal(), causal),
        "window": (Causal() & SlidingWindow(9), causal & (pos[:, None] - pos[None, :] < 9)),
        "padding": (Causal() & Padding(lengths),
                    causal & (pos[None, None, None, :] < lengths[:, None, None, None])),
    }[mask]
    bias = torch.randn(1, hq, t, t) if with_bias else None
    scale = 0.3
    _, lse = attention(q, k, v, rule, bias=bias, softcap=softcap, scale=scale, return_lse=True)
    rows = torch.tensor([0, 1, 50, 51, 112])
    got = hf.probabilities(q, k, rule, lse, bias=bias, softcap=softcap, scale=scale, rows=rows)
    want = _softmax64(q, k, visible.expand(b, hq, t, t), scale=scale, softcap=softcap,
                      bias=bias)[:, :, rows]
    assert got.dtype == torch.float32 and got.shape == (b, hq, len(rows), t)
    assert ((got.double() - want).norm() / want.norm()) < 1e-5
    half = hf.probabilities(q, k, rule, lse, bias=bias, softcap=softcap, scale=scale,
                            rows=rows, dtype=torch.float16)
    assert half.dtype == torch.float16
    assert ((half.double() - want).norm() / want.norm()) < 2e-3
