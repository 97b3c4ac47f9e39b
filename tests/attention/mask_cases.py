"""MASK_CASES: the one table of masks and score options that every backend's tests draw from.

Each entry maps a name to ``make(b, hq, tq, tk) -> dict`` of :func:`maskedattn.attention` keyword
arguments (``mask``, ``bias``, ``softcap``, ``scale``), deterministic for given sizes. Adding a
mask kind means adding its cases here (see docs/adding-a-mask.md); the tiled, Triton, SDPA,
operator and compile tests then all cover it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from maskedattn.attention import (
    Alibi,
    Causal,
    ChunkedCausal,
    DenseMask,
    Documents,
    Padding,
    PrefixLM,
    SlidingWindow,
)


def doc_ids(b: int, t: int, seed: int) -> torch.Tensor:
    """Sorted document ids: a few packed documents of random lengths per batch row."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (b, t), generator=g).sort(dim=1).values


def _gen(tq: int, tk: int) -> torch.Generator:
    return torch.Generator().manual_seed(tq * 1000 + tk)


def _dense(b: int, tq: int, tk: int) -> torch.Tensor:
    return torch.rand(b, 1, tq, tk, generator=_gen(tq, tk)) > 0.3


def _lengths(b: int, tk: int) -> list[int]:
    return [max(1, tk - 7 * i) for i in range(b)]


Make = Callable[[int, int, int, int], dict]

#: masks only (every kind, and combinations)
MASKS: dict[str, Make] = {
    "none": lambda b, hq, tq, tk: {},
    "causal": lambda b, hq, tq, tk: {"mask": Causal()},
    "window": lambda b, hq, tq, tk: {"mask": SlidingWindow(17)},
    "prefix": lambda b, hq, tq, tk: {"mask": PrefixLM(min(tk, 23))},
    "chunked": lambda b, hq, tq, tk: {"mask": ChunkedCausal(20)},
    "padding": lambda b, hq, tq, tk: {"mask": Padding(_lengths(b, tk))},
    "causal&padding": lambda b, hq, tq, tk: {"mask": Causal() & Padding(_lengths(b, tk))},
    "documents": lambda b, hq, tq, tk: {"mask": Documents(doc_ids(b, tk, tk))},
    "documents&causal": lambda b, hq, tq, tk: {
        "mask": Documents(doc_ids(b, tk, tk + 1)) & Causal()},
    "window&documents": lambda b, hq, tq, tk: {
        "mask": SlidingWindow(9) & Documents(doc_ids(1, tk, tk + 2))},
    "chunked&padding": lambda b, hq, tq, tk: {
        "mask": ChunkedCausal(13) & Padding(_lengths(b, tk))},
    "dense": lambda b, hq, tq, tk: {"mask": _dense(b, tq, tk)},
    "dense&window&padding": lambda b, hq, tq, tk: {
        "mask": DenseMask(_dense(b, tq, tk)) & SlidingWindow(40) & Padding(_lengths(b, tk))},
}

#: score options (each with a mask)
SCORES: dict[str, Make] = {
    "alibi": lambda b, hq, tq, tk: {"mask": Causal(), "bias": Alibi(Alibi.default_slopes(hq))},
    "bias": lambda b, hq, tq, tk: {
        "mask": Causal(), "bias": torch.randn(1, hq, tq, tk, generator=_gen(tq, tk))},
    "bias_rows": lambda b, hq, tq, tk: {  # one row per head, broadcast over the queries
        "mask": Causal(), "bias": torch.randn(hq, 1, tk, generator=_gen(tq, tk))},
    "softcap": lambda b, hq, tq, tk: {"mask": Causal(), "softcap": 3.0},
    "softcap&alibi&window": lambda b, hq, tq, tk: {
        "mask": SlidingWindow(30), "softcap": 5.0, "bias": Alibi(Alibi.default_slopes(hq))},
    "scale": lambda b, hq, tq, tk: {"mask": Causal(), "scale": 0.3},
}

MASK_CASES: dict[str, Make] = {**MASKS, **SCORES}
