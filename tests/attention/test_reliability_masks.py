"""Mask specs given bad values say what is wrong in their own words, not torch's."""

from __future__ import annotations

import pytest
import torch

import maskedattn as ma
from maskedattn.attention.masks import Causal, DenseMask, Documents, Padding


@pytest.mark.parametrize("make, error, match", [
    (lambda: Padding("ab"), TypeError, "Padding: lengths must be a tensor or a list of integers"),
    (lambda: Padding([2**70]), ValueError, "Padding: lengths must be integers that fit in int64"),
    (lambda: Padding([]), ValueError, "Padding: lengths is empty"),
    (lambda: Documents([[0, 1], [0]]), ValueError, "Documents: ids must be integers"),
    (lambda: Causal() & torch.ones(4, 4, dtype=torch.bool), TypeError, r"DenseMask\(tensor\)"),
    (lambda: DenseMask(torch.ones(4, 4, dtype=torch.bool, device="meta")), ValueError,
     "meta device"),
    (lambda: Padding(torch.tensor([3], device="meta")), ValueError, "meta device"),
])
def test_bad_mask_values_are_named(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def test_a_meta_dense_mask_is_refused_by_attention() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="meta device"):
        ma.attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.bool, device="meta"))
