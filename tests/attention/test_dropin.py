"""maskedattn.scaled_dot_product_attention against torch's own, over drawn arguments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maskedattn as ma
from maskedattn.attention import dropin
from tests.helpers import relative_error


@st.composite
def sdpa_calls(draw):
    """Arguments of an SDPA call: leading dims, GQA, L <= S or not, masks of every kind."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    gqa = draw(st.booleans())
    hkv = draw(st.integers(1, 2))
    hq = hkv * (draw(st.integers(1, 3)) if gqa else 1)
    tk = draw(st.sampled_from([1, 5, 17, 40]))
    tq = draw(st.sampled_from([1, 3, tk, tk + 2]))
    e = draw(st.sampled_from([4, 8, 13]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, hq, tq, e, generator=g)
    k, v = (torch.randn(*lead, hkv, tk, e, generator=g) for _ in range(2))
    if draw(st.booleans()) and not lead and hq == hkv:  # the 3-D form (N, L, E)
        q, k, v = q[0] if q.dim() > 3 else q, k[0] if k.dim() > 3 else k, v[0] if v.dim() > 3 else v
    kind = draw(st.sampled_from(["none", "causal", "bool", "float", "tril", "padding"]))
    mask, is_causal = None, False
    rows = q.shape[-2]
    if kind == "causal":
        is_causal = True
    elif kind == "bool":
        shape = draw(st.sampled_from([(rows, tk), (1, tk), (*q.shape[:-2], rows, tk)]))
        mask = torch.rand(shape, generator=g) > 0.3
    elif kind == "float":
        mask = torch.randn(*q.shape[:-2], rows, tk, generator=g)
        mask[..., 0, :] = float("-inf")  # a row that sees nothing
    elif kind == "tril":
        mask = torch.ones(rows, tk, dtype=torch.bool).tril()
    elif kind == "padding":
        lengths = torch.randint(0, tk + 1, q.shape[:-3] or (1,), generator=g)
        mask = (torch.arange(tk) < lengths[..., None]).reshape(*q.shape[:-3], 1, 1, tk)
    scale = draw(st.sampled_from([None, 0.5]))
    return q, k, v, dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sdpa_calls())
def test_matches_torch_sdpa(call):
    q, k, v, kwargs = call
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = ma.scaled_dot_product_attention(q, k, v, **kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert relative_error(got, want) < 1e-5


def test_gradients_match_torch_sdpa():
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 3, 11, 8, generator=g) for _ in range(3)]
    mask = torch.rand(11, 11, generator=g) > 0.4

    def grads(fn):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        fn(q, k, v, attn_mask=mask).square().sum().backward()
        return q.grad, k.grad, v.grad

    for got, want in zip(grads(ma.scaled_dot_product_attention),
                         grads(F.scaled_dot_product_attention), strict=True):
        assert relative_error(got, want) < 1e-5


def test_structure_is_recognised():
    t = 9
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    assert dropin._recognise(causal, causal.expand(1, 1, t, t), (), t, t) == ma.Causal()
    lengths = torch.tensor([4, 9])
    pad = (torch.arange(t) < lengths[:, None])[:, None, None, :]
    rule = dropin._recognise(pad, pad.expand(2, 3, t, t), (2,), t, t)
    assert rule.dense is None and torch.equal(rule.lengths, lengths)


def test_dropout_and_unsupported_calls_go_to_torch(monkeypatch):
    q = torch.randn(1, 2, 5, 8)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(dropin.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    ma.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    ma.scaled_dot_product_attention(q, q, torch.randn(1, 2, 5, 16))  # wider values
    assert [c["dropout_p"] for c in calls] == [0.5, 0.0]
    both = dict(attn_mask=torch.rand(5, 5) > 0.5, is_causal=True)  # SDPA decides what it means
    torch.testing.assert_close(ma.scaled_dot_product_attention(q, q, q, **both),
                               real(q, q, q, **both))
    assert len(calls) == 3


def test_compiles_without_graph_breaks():
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    mask = torch.rand(9, 9) > 0.3
    f = torch.compile(ma.scaled_dot_product_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch._dynamo.reset()
