"""The tiled backward is reproducible bit for bit: across reruns and across thread counts.

dq sums contributions from every key tile; the native kernel adds them in key-tile order
whichever threads compute them (docs/cpu-kernel.md, "Reproducibility"). These tests fail if the
order ever depends on which thread arrives first.
"""

from __future__ import annotations

import pytest
import torch

import maskedattn as ma
from maskedattn.attention import Causal, Documents, SlidingWindow, native
from tests.helpers import random_qkv

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="no native kernel here")


def _grads(q, k, v, do, mask, threads: int, **kwargs) -> tuple[torch.Tensor, ...]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ma.attention(q, k, v, mask, backend="tiled", **kwargs).backward(do)
    finally:
        torch.set_num_threads(before)
    return q.grad, k.grad, v.grad


# Contexts spanning several key tiles (128 keys each), one kv head so that the work items of
# neighbouring key tiles run at the same time; odd lengths leave partial tiles.
CASES = {
    "causal-f32": (1, 1, 1, 700, torch.float32, Causal(), {}),
    "gqa-bf16": (2, 4, 2, 389, torch.bfloat16, Causal(), {}),
    "window-softcap-f32": (1, 2, 1, 513, torch.float32, SlidingWindow(200), {"softcap": 20.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backward_is_identical_across_reruns_and_threads(case) -> None:
    b, hq, hkv, t, dtype, mask, kwargs = CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(b, hq, hkv, t, t, 64, dtype=dtype, generator=gen)
    do = torch.randn(q.shape, generator=gen).to(dtype)
    first = _grads(q, k, v, do, mask, 2, **kwargs)
    for run in range(12):
        again = _grads(q, k, v, do, mask, 2, **kwargs)
        for name, x, y in zip(["q", "k", "v"], first, again, strict=True):
            assert torch.equal(x, y), f"d{name} differs on rerun {run}"
    # one thread and three (more threads than cores) add in the same order as two
    for threads in (1, 3):
        other = _grads(q, k, v, do, mask, threads, **kwargs)
        for name, x, y in zip(["q", "k", "v"], first, other, strict=True):
            assert torch.equal(x, y), f"d{name} differs between 2 and {threads} threads"


def test_documents_backward_is_identical_across_reruns() -> None:
    # Python-classified tile kinds: empty tiles between documents are skipped in the order too.
    t = 600
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([150, 260, 90, 100]))[None]
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(1, 2, 1, t, t, 32, generator=gen)
    do = torch.randn(q.shape, generator=gen)
    mask = Causal() & Documents(ids)
    first = _grads(q, k, v, do, mask, 2)
    for _ in range(6):
        for x, y in zip(first, _grads(q, k, v, do, mask, 2), strict=True):
            assert torch.equal(x, y)


def test_pure_torch_twin_backward_is_identical_across_reruns(monkeypatch) -> None:
    # MASKEDATTN_NATIVE=0: the readable twin, which adds dq tile by tile in key-tile order too
    monkeypatch.setenv("MASKEDATTN_NATIVE", "0")
    gen = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(1, 2, 1, 300, 300, 32, generator=gen)
    do = torch.randn(q.shape, generator=gen)
    first = _grads(q, k, v, do, Causal(), 2)
    for _ in range(3):
        for x, y in zip(first, _grads(q, k, v, do, Causal(), 2), strict=True):
            assert torch.equal(x, y)
