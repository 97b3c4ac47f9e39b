"""Masks: dense forms against hand-written matrices, tile classification against dense forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskedattn.attention.masks import (
    Alibi,
    Causal,
    ChunkedCausal,
    DenseMask,
    Documents,
    Mask,
    Padding,
    PrefixLM,
    SlidingWindow,
    TileKind,
    as_rule,
)


def grid(rows: str) -> torch.Tensor:
    """A boolean matrix from lines of 'x' (visible) and '.' (hidden)."""
    return torch.tensor([[c == "x" for c in r.split()] for r in rows.strip().splitlines()])


CASES = [
    (Causal(), 4, 4, """
        x . . .
        x x . .
        x x x .
        x x x x"""),
    # Decoding: 2 queries at positions 3 and 4 of 5 keys.
    (Causal(), 2, 5, """
        x x x x .
        x x x x x"""),
    (SlidingWindow(2), 5, 5, """
        x . . . .
        x x . . .
        . x x . .
        . . x x .
        . . . x x"""),
    (SlidingWindow(1), 3, 3, """
        x . .
        . x .
        . . x"""),
    (PrefixLM(2), 4, 4, """
        x x . .
        x x . .
        x x x .
        x x x x"""),
    # Chunks of 2: causal inside [0, 1], [2, 3], [4]; decoding rows align to the end.
    (ChunkedCausal(2), 5, 5, """
        x . . . .
        x x . . .
        . . x . .
        . . x x .
        . . . . x"""),
    (ChunkedCausal(3), 2, 5, """
        . . . x .
        . . . x x"""),
    (PrefixLM(0), 3, 3, """
        x . .
        x x .
        x x x"""),
    (Documents([0, 0, 1, 1, 1]), 5, 5, """
        x x . . .
        x x . . .
        . . x x x
        . . x x x
        . . x x x"""),
    (Documents([0, 0, 1, 1, 1]) & Causal(), 5, 5, """
        x . . . .
        x x . . .
        . . x . .
        . . x x .
        . . x x x"""),
    (Causal() & SlidingWindow(3) & Documents([0, 0, 0, 0, 1]), 5, 5, """
        x . . . .
        x x . . .
        x x x . .
        . x x x .
        . . . . x"""),
    (PrefixLM(3) & SlidingWindow(2), 4, 4, """
        x . . .
        x x . .
        . x x .
        . . x x"""),
]


@pytest.mark.parametrize(("mask", "tq", "tk", "expected"), CASES, ids=lambda x: repr(x)[:40])
def test_dense_matches_hand_written(mask: Mask, tq: int, tk: int, expected: str) -> None:
    dense = mask.dense_mask(tq, tk)
    assert dense.shape == (1, 1, tq, tk)
    assert torch.equal(dense[0, 0], grid(expected))


def test_padding_is_per_batch_row() -> None:
    dense = Padding([2, 4, 0]).dense_mask(3, 4)
    assert dense.shape == (3, 1, 3, 4)
    assert torch.equal(dense[0, 0], grid("x x . .\n" * 3))
    assert torch.equal(dense[1, 0], torch.ones(3, 4, dtype=torch.bool))
    assert not dense[2].any()


def test_documents_per_batch_row_and_combined_ids() -> None:
    ids = torch.tensor([[0, 0, 1], [5, 6, 6]])
    dense = Documents(ids).dense_mask(3, 3)
    assert torch.equal(dense[1, 0], grid("x . .\n. x x\n. x x"))
    # Two Documents specs: visible only where both ids agree.
    both = (Documents([0, 0, 1, 1]) & Documents([0, 1, 1, 1])).dense_mask(4, 4)
    assert torch.equal(both[0, 0], grid("x . . .\n. x . .\n. . x x\n. . x x"))


def test_dense_mask_spec_and_tensor_are_the_same() -> None:
    m = torch.rand(2, 1, 3, 5) > 0.5
    assert torch.equal(DenseMask(m).dense_mask(3, 5), m)
    assert torch.equal(as_rule(m).dense_mask(3, 5), m)


def test_combining_is_intersection() -> None:
    a, b = SlidingWindow(3), PrefixLM(2) & Padding([5])
    both = (a & b).dense_mask(6, 6)
    assert torch.equal(both, a.dense_mask(6, 6) & b.dense_mask(6, 6))
    assert repr(a & b) == "SlidingWindow(w=3) & PrefixLM(n=2) & Padding([5])"


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: SlidingWindow(0), ValueError, "w must be an integer >= 1"),
        (lambda: SlidingWindow(2.5), ValueError, "w must be an integer"),
        (lambda: PrefixLM(-1), ValueError, "n must be an integer >= 0"),
        (lambda: ChunkedCausal(0), ValueError, "n must be an integer >= 1"),
        (lambda: (ChunkedCausal(2) & ChunkedCausal(3)).rule(), ValueError,
         "chunks of 2 and 3 positions cannot be combined"),
        (lambda: Padding([3, -1]), ValueError, "lengths must be >= 0"),
        (lambda: Padding([[1, 2]]), ValueError, "shape (B,)"),
        (lambda: Padding([1.5]), TypeError, "must hold integers"),
        (lambda: Documents(torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, "(B, Tk)"),
        (lambda: DenseMask(torch.ones(3, 3)), TypeError, "bool tensor"),
        (lambda: DenseMask(torch.ones(3, dtype=torch.bool)), ValueError, "2 to 4 dimensions"),
        (lambda: Alibi(torch.ones(2, 2)), ValueError, "shape (Hq,)"),
        (lambda: as_rule("causal"), TypeError, "mask must be None, a mask spec"),
    ],
)
def test_bad_specs_raise(make, error, words) -> None:
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_fit_rejects_shapes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"Padding has 3 lengths, but the batch has B=2"):
        Padding([1, 2, 3]).rule().fit(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"Documents ids have shape \(1, 4\), wanted \(2, 5\)"):
        Documents([0, 0, 1, 1]).rule().fit(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, Hq, Tq, Tk\)"):
        DenseMask(torch.ones(3, 4, dtype=torch.bool)).rule().fit(1, 1, 5, 5)


def test_alibi_default_slopes() -> None:
    expected = torch.tensor([2.0 ** -(i + 1) for i in range(8)], dtype=torch.float64)
    assert torch.allclose(Alibi.default_slopes(8), expected)
    slopes = Alibi.default_slopes(12)  # not a power of two: 8 geometric, then 4 interleaved
    assert slopes.shape == (12,) and torch.all(slopes > 0)
    bias = Alibi(torch.tensor([0.5])).block(torch.arange(2), torch.arange(3), 1)
    assert torch.equal(bias[0, 0], torch.tensor([[-0.5, 0.0, -0.5], [-1.0, -0.5, 0.0]]))


# -- tile classification ---------------------------------------------------------------------


@st.composite
def masks_and_sizes(draw):
    tk = draw(st.integers(1, 40))
    tq = draw(st.integers(1, tk))
    b = draw(st.integers(1, 3))
    chunk = draw(st.integers(1, tk + 2))
    parts: list[Mask] = []
    for kind in draw(st.lists(st.sampled_from(
            ["causal", "window", "prefix", "chunked", "padding", "documents", "dense"]),
            max_size=3)):
        if kind == "causal":
            parts.append(Causal())
        elif kind == "window":
            parts.append(SlidingWindow(draw(st.integers(1, tk + 2))))
        elif kind == "prefix":
            parts.append(PrefixLM(draw(st.integers(0, tk + 2))))
        elif kind == "chunked":
            parts.append(ChunkedCausal(chunk))  # one size per mask: sizes do not combine
        elif kind == "padding":
            parts.append(Padding(draw(st.lists(st.integers(0, tk + 2), min_size=b, max_size=b))))
        elif kind == "documents":
            ids = sorted(draw(st.lists(st.integers(0, 4), min_size=tk, max_size=tk)))
            parts.append(Documents(ids))
        else:
            seed = draw(st.integers(0, 2**16))
            g = torch.Generator().manual_seed(seed)
            parts.append(DenseMask(torch.rand(b, 1, tq, tk, generator=g) > 0.3))
    mask = parts[0] if parts else Causal()
    for p in parts[1:]:
        mask = mask & p
    exact = len(parts) <= 1 and not isinstance(mask, (Documents, DenseMask))
    return mask, exact, b, tq, tk, draw(st.integers(1, 9)), draw(st.integers(1, 9))


@settings(max_examples=300, deadline=None)
@given(masks_and_sizes())
def test_tile_classification_agrees_with_dense(case) -> None:
    mask, exact, b, tq, tk, block_q, block_k = case
    rule = mask.rule().fit(b, 1, tq, tk)
    dense = rule.dense_mask(tq, tk)
    kinds = rule.classify(tq, tk, block_q, block_k)
    bm, hm = dense.shape[:2]
    assert kinds.shape == (bm, hm, -(-tq // block_q), -(-tk // block_k))
    for bi in range(bm):
        for i in range(kinds.shape[2]):
            for j in range(kinds.shape[3]):
                tile = dense[bi, 0, i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
                kind = TileKind(int(kinds[bi, 0, i, j]))
                if kind == TileKind.EMPTY:
                    assert not tile.any()
                elif kind == TileKind.FULL:
                    assert tile.all()
                elif exact:
                    # A single positional primitive or padding is classified exactly.
                    assert tile.any() and not tile.all()
