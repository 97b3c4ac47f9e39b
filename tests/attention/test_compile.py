"""torch.compile(fullgraph=True) and torch.export of attention, a user module and the GPT.

fullgraph=True turns any graph break into an error; a counting backend shows how many graphs
were compiled (recompiles). Tiny shapes: compiling is slow on a small machine. Dynamo's
"eager" backend checks the tracing alone, "aot_eager" adds AOTAutograd (the operators' fake
implementations and registered backward); inductor itself runs under ``-m slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import maskedattn as ma
from maskedattn import GPT, GPTConfig
from maskedattn.generate import decode_one_token
from tests.attention.mask_cases import MASK_CASES


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(b=2, hq=4, hkv=2, tq=9, tk=9, d=8, grad=False):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, t, d, generator=g).requires_grad_(grad)
                 for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_attention_compiles_without_graph_breaks(name):
    q, k, v = _qkv()
    kwargs = MASK_CASES[name](2, 4, 9, 9)

    def f(q, k, v):
        return ma.attention(q, k, v, **kwargs)

    counter = CompileCounterWithBackend("eager")
    got = torch.compile(f, fullgraph=True, backend=counter)(q, k, v)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, f(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["chunked&padding",
                                  *(pytest.param(n, marks=pytest.mark.slow)
                                    for n in ("documents&causal", "alibi", "dense"))])
def test_forward_and_backward_through_aot_autograd(name):
    q, k, v = _qkv(grad=True)
    kwargs = MASK_CASES[name](2, 4, 9, 9)

    def loss(q, k, v):
        return ma.attention(q, k, v, **kwargs).square().sum()

    counter = CompileCounterWithBackend("aot_eager")
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend=counter)(q, k, v),
                              (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    assert counter.frame_count == 1
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_dynamic_sequence_lengths_compile_once():
    counter = CompileCounterWithBackend("eager")
    f = torch.compile(lambda q, k, v: ma.attention(q, k, v, ma.Causal()), fullgraph=True,
                      dynamic=True, backend=counter)
    for t in (9, 13, 30):
        q, k, v = _qkv(tq=t, tk=t)
        torch.testing.assert_close(f(q, k, v), ma.attention(q, k, v, ma.Causal()))
    assert counter.frame_count == 1


class _UserAttention(torch.nn.Module):
    """A user's module: projections, then ma.attention with a padding mask."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = ma.attention(q, k, v, ma.Causal() & ma.Padding(lengths))
        return y.transpose(1, 2).flatten(2)


def test_user_module_compiles_and_exports():
    torch.manual_seed(0)
    module, x, lengths = _UserAttention(), torch.randn(2, 11, 16), torch.tensor([11, 6])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    torch.testing.assert_close(compiled(x, lengths), module(x, lengths))
    assert counter.frame_count == 1

    program = torch.export.export(module, (x, lengths))
    assert "maskedattn.tiled_fwd" in program.graph_module.code
    x2, lengths2 = torch.randn(2, 11, 16), torch.tensor([3, 9])
    torch.testing.assert_close(program.module()(x2, lengths2), module(x2, lengths2))


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", n_layer=2, n_embd=32, n_head=2, context=32))


def test_gpt_forward_and_backward_compile_to_one_graph():
    model, tokens = _tiny_gpt(), torch.randint(0, 256, (2, 13))
    counter = CompileCounterWithBackend("aot_eager")
    loss = torch.compile(lambda t: model(t, t).loss, fullgraph=True, backend=counter)(tokens)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(tokens, tokens).loss.backward()
    assert counter.frame_count == 1
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_gpt_decode_step_with_static_cache_never_recompiles():
    model = _tiny_gpt().eval()
    cache = model.new_cache(2, 24)
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        model.hidden_states(torch.randint(0, 256, (2, 5)), cache=cache)
        eager_cache = copy.deepcopy(cache)
        counter = CompileCounterWithBackend("eager")
        step = torch.compile(decode_one_token, fullgraph=True, backend=counter)
        for _ in range(4):
            token = torch.randint(0, 256, (2,))
            torch.testing.assert_close(step(model, token, lengths, cache),
                                       decode_one_token(model, token, lengths, eager_cache))
            lengths = lengths + 1
    assert counter.frame_count == 1


def test_gpt_exports():
    model, tokens = _tiny_gpt().eval(), torch.randint(0, 256, (2, 13))
    program = torch.export.export(model, (tokens,))
    other = torch.randint(0, 256, (2, 13))
    torch.testing.assert_close(program.module()(other).logits, model(other).logits)


def test_inductor_gpt_training_step_under_autocast():
    # A compiled module called inside an autocast region (nanoGPT's train.py does this) has its
    # backward traced inside the region too; there the attention backward once had its float32
    # lse cast to bfloat16, and every gradient upstream of attention came out NaN.
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, context=16))
    tokens = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model, fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(tokens, tokens).loss
        loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, tokens).loss
    loss.backward()
    for (name, p), g in zip(model.named_parameters(), got, strict=True):
        assert torch.isfinite(g).all(), name
        assert (g - p.grad).norm() <= 2e-2 * p.grad.norm(), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["causal", "chunked&padding", "bias"])
def test_inductor_forward_and_backward(name):
    q, k, v = _qkv(grad=True)
    kwargs = MASK_CASES[name](2, 4, 9, 9)

    def loss(q, k, v):
        return ma.attention(q, k, v, **kwargs).square().sum()

    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_inductor_with_projection_views_under_autocast():
    # q, k, v as a model makes them (views of one projection), bfloat16 under autocast: the
    # operators' outputs keep that layout, and inductor, which passes a custom operator the
    # traced strides exactly, must find the fakes' strides in what the kernel returns.
    torch.manual_seed(0)
    b, t, h, d = 2, 16, 2, 16
    c = h * d
    w_qkv, w_o = torch.randn(c, 3 * c, requires_grad=True), torch.randn(c, c, requires_grad=True)

    def block(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = (y.view(b, t, h, d).transpose(1, 2) for y in (x @ w_qkv).split(c, -1))
            y = ma.attention(q, k, v, ma.Causal())
            return (y.transpose(1, 2).reshape(b, t, c) @ w_o).float().square().mean()

    x = torch.randn(b, t, c)
    with torch._inductor.config.patch(force_disable_caches=True):
        got = torch.compile(block, fullgraph=True)(x)
    got_grads = torch.autograd.grad(got, (w_qkv, w_o))
    want = block(x)
    want_grads = torch.autograd.grad(want, (w_qkv, w_o))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g - w).norm() / w.norm() < 2e-2
