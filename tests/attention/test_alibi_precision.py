"""ALiBi in float64 is float64-accurate: the slopes are not rounded to float32 on the way."""

from __future__ import annotations

import pytest
import torch

import maskedattn as ma
from maskedattn.attention import Alibi, Causal
from tests.helpers import random_qkv, relative_error


def _explicit_bias(slopes: torch.Tensor, tq: int, tk: int) -> torch.Tensor:
    """-slope_h |q - k| written out in float64, queries aligned to the end of the keys."""
    q_pos = torch.arange(tq, dtype=torch.float64)[:, None] + (tk - tq)
    k_pos = torch.arange(tk, dtype=torch.float64)[None, :]
    return -slopes.double()[:, None, None] * (q_pos - k_pos).abs()


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa"])
@pytest.mark.parametrize(("tq", "tk"), [(37, 37), (5, 113)])
def test_float64_alibi_matches_an_explicit_float64_bias(backend, tq, tk) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(2, 12, 4, tq, tk, 16, dtype=torch.float64, generator=gen)
    # 12 heads: slopes that float32 cannot hold exactly
    slopes = Alibi.default_slopes(12)
    assert slopes.dtype == torch.float64
    got = ma.attention(q, k, v, Causal(), bias=Alibi(slopes), backend=backend)
    want = ma.attention(q, k, v, Causal(), bias=_explicit_bias(slopes, tq, tk),
                        backend="reference")
    assert relative_error(got, want) < 1e-14


def test_float32_calls_still_take_float32_slopes() -> None:
    q, k, v = random_qkv(1, 12, 12, 20, 20, 8)
    from maskedattn.attention import lower_call

    call = lower_call(q, k, v, Causal(), bias=Alibi(Alibi.default_slopes(12)))
    assert call.bias.slopes.dtype == torch.float32
