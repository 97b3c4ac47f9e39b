"""AttentionPlan: attention() with its mask and options fixed, lowered once for calls alike."""

from __future__ import annotations

import importlib

import pytest
import torch

import maskedattn as ma
from tests.helpers import random_qkv

API = importlib.import_module("maskedattn.attention.api")

MASKS = {
    "none": lambda: None,
    "causal": ma.Causal,
    "padding": lambda: ma.Causal() & ma.Padding(torch.tensor([9, 4])),
    "window+documents": lambda: ma.SlidingWindow(3) & ma.Documents(
        torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]] * 2)),
    "dense": lambda: torch.rand(2, 1, 5, 9, generator=torch.Generator().manual_seed(0)) > 0.3,
}


@pytest.mark.parametrize("backend", ["auto", "tiled", "sdpa", "reference"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_every_call_equals_attention(backend, mask):
    spec = MASKS[mask]()
    plan = ma.AttentionPlan(spec, backend=backend)
    g = torch.Generator().manual_seed(1)
    for tq in (5, 5, 5, 1, 5):  # a run of alike calls, one that differs, then alike again
        q, k, v = random_qkv(2, 4, 2, tq, 9, 16, generator=g)
        if mask == "dense" and tq == 1:
            continue  # the dense mask is drawn for 5 queries
        want = ma.attention(q, k, v, spec, backend=backend)
        assert torch.equal(plan(q, k, v), want)


def test_calls_alike_are_lowered_once(monkeypatch):
    lowered = []
    real = API.lower_call
    monkeypatch.setattr(API, "lower_call", lambda *a, **kw: lowered.append(1) or real(*a, **kw))
    plan = ma.AttentionPlan(ma.Causal())
    q, k, v = random_qkv(1, 2, 2, 4, 6, 8)
    with torch.no_grad():
        for _ in range(5):
            plan(q, k, v)
    assert len(lowered) == 1
    with torch.no_grad():
        plan(q[:, :, :3], k, v)  # another shape: planned afresh
    assert len(lowered) == 2
    leaf = q.clone().requires_grad_()
    plan(leaf, k, v).sum().backward()  # a gradient wanted: planned afresh, and it flows
    assert len(lowered) == 3 and leaf.grad is not None
    plan(q.double(), k.double(), v.double())  # another dtype
    assert len(lowered) == 4


def test_options_and_lse_as_attention():
    q, k, v = random_qkv(1, 4, 4, 6, 6, 8)
    slopes = ma.Alibi(torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    plan = ma.AttentionPlan(ma.Causal(), bias=slopes, softcap=5.0, scale=0.3, return_lse=True)
    for _ in range(2):
        out, lse = plan(q, k, v)
        want_out, want_lse = ma.attention(q, k, v, ma.Causal(), bias=slopes, softcap=5.0,
                                          scale=0.3, return_lse=True)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_nan_reaches_only_rows_that_read_it_through_the_plan():
    plan = ma.AttentionPlan(ma.Causal())
    q, k, v = random_qkv(1, 2, 2, 6, 6, 8)
    clean = plan(q, k, v)
    k = k.clone()
    k[0, 1, 2, 0] = float("nan")  # the second, alike call reuses the plan
    out = plan(q, k, v)
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[1, 2:] = True
    assert torch.equal(torch.isnan(out).any(-1)[0], expected)
    assert torch.equal(out[0, 0], clean[0, 0]) and torch.equal(out[0, 1, :2], clean[0, 1, :2])


def test_bad_input_raises_what_attention_raises():
    plan = ma.AttentionPlan(ma.Padding([1, 2, 3]))
    q, k, v = random_qkv(2, 4, 2, 5, 7, 8)
    with pytest.raises(ValueError, match=r"Padding has 3 lengths"):
        plan(q, k, v)
    with pytest.raises(ValueError, match=r"Hq=3 heads, which is not a multiple of the Hkv=2"):
        ma.AttentionPlan()(q[:, :3], k, v)
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor, got list"):
        ma.AttentionPlan()([1.0], k, v)
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        ma.AttentionPlan(backend="flash9")(q, k, v)


def test_autocast_and_observers_as_attention():
    from maskedattn.attention.observe import observe_attention

    q, k, v = random_qkv(1, 2, 2, 4, 4, 8)
    plan = ma.AttentionPlan(ma.Causal())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plan(q, k, v).dtype == torch.bfloat16
    seen = []
    with observe_attention(seen.append):
        plan(q, k, v)
        plan(q, k, v)
    assert len(seen) == 2 and all(s.call.rule.causal for s in seen)


def test_a_compiled_function_calling_a_plan_has_one_graph():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    plan = ma.AttentionPlan(ma.Causal())

    @torch.compile(backend=counter, fullgraph=True)
    def f(q, k, v):
        return plan(q, k, v) * 2

    q, k, v = random_qkv(1, 2, 2, 4, 4, 8)
    torch.testing.assert_close(f(q, k, v), ma.attention(q, k, v, ma.Causal()) * 2)
    assert counter.frame_count == 1
