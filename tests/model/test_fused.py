"""The fast paths of the model's layers against their plain twins (float64 references)."""

import pytest
import torch
import torch.nn.functional as F

from maskedattn.model import GPT, GPTConfig, cpu_linear, gemv

pytestmark = pytest.mark.skipif(not cpu_linear._AVAILABLE, reason="torch built without oneDNN")


def _inputs(shape, n, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(n, shape[-1], generator=g, requires_grad=True)
    b = torch.randn(n, generator=g, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape", [(5, 113), (3, 7, 64), (2, 257, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_float64_like_f_linear(shape, bias):
    x, w, b = _inputs(shape, 257, bias)
    assert cpu_linear.serves(x, w, gemv.MAX_ROWS)
    grad = torch.randn(*shape[:-1], 257, generator=torch.Generator().manual_seed(1))
    ours = cpu_linear.linear(x, w, b)
    ours_grads = torch.autograd.grad(ours, [t for t in (x, w, b) if t is not None], grad)
    plain = F.linear(x, w, b)
    plain_grads = torch.autograd.grad(plain, [t for t in (x, w, b) if t is not None], grad)
    x64, w64 = x.double(), w.double()
    ref = F.linear(x64, w64, None if b is None else b.double())
    ref_grads = torch.autograd.grad(ref, [t for t in (x64, w64) if t is not None], grad.double())
    # As close to float64 as F.linear is (fp32 accumulation; only the order differs).
    for got, want, theirs in zip((ours, *ours_grads), (ref, *ref_grads), (plain, *plain_grads),
                                 strict=False):
        err, plain_err = (got.double() - want).abs().max(), (theirs.double() - want).abs().max()
        assert err <= 4 * plain_err + 1e-6, (err, plain_err)
    if b is not None:
        assert torch.allclose(ours_grads[-1], grad.flatten(0, -2).sum(0), rtol=1e-5, atol=1e-5)


def test_noncontiguous_input_and_no_grad():
    x, w, b = _inputs((40, 96), 50, True)
    xt = x.detach().t().contiguous().t()  # same values, column-major
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear.linear(xt, w, b), F.linear(xt, w, b))
    with torch.inference_mode():
        torch.testing.assert_close(cpu_linear.linear(xt, w, b), F.linear(xt, w, b))


def test_when_it_serves():
    x, w, _ = _inputs((8, 16), 4, False)
    assert cpu_linear.serves(x, w, gemv.MAX_ROWS)
    assert not cpu_linear.serves(x[:4], w, gemv.MAX_ROWS)  # decode rows: the GEMV kernel's
    assert not cpu_linear.serves(x.bfloat16(), w.bfloat16(), gemv.MAX_ROWS)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own F.linear rule applies
        assert not cpu_linear.serves(x, w, gemv.MAX_ROWS)


@pytest.mark.parametrize("fn", [cpu_linear.linear, F.linear])
def test_double_backward_equals_f_linear(fn):
    x, w, b = _inputs((6, 8), 5, True)
    (gx,) = torch.autograd.grad((fn(x, w, b) ** 2).sum(), x, create_graph=True)
    got = torch.autograd.grad(gx.pow(2).sum(), (x, w, b))
    (gx,) = torch.autograd.grad((F.linear(x, w, b) ** 2).sum(), x, create_graph=True)
    want = torch.autograd.grad(gx.pow(2).sum(), (x, w, b))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_gpt_training_step_equals_the_plain_linear_path(monkeypatch):
    config = GPTConfig.preset("tiny", n_layer=2, n_embd=64, n_head=4, context=37)
    torch.manual_seed(0)
    model = GPT(config)
    tokens = torch.randint(0, config.vocab_size, (3, 37))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, tokens).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    monkeypatch.setattr(cpu_linear, "serves", lambda *a: False)
    plain_loss, plain_grads = loss_and_grads()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_graph_keeps_the_operator_and_its_gradients():
    x, w, b = _inputs((3, 40, 96), 50, True)

    def loss(x, w, b):
        return (cpu_linear.linear(x, w, b) if cpu_linear.serves(x, w, gemv.MAX_ROWS)
                else F.linear(x, w, b)).square().sum()

    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    got = torch.compile(loss, backend=backend, fullgraph=True)(x, w, b)
    assert any("onednn_linear" in op for op in ops), ops
    got_grads = torch.autograd.grad(got, (x, w, b))
    compiled = torch.compile(loss, backend="inductor", fullgraph=True)(x, w, b)
    want = F.linear(x, w, b).square().sum()
    want_grads = torch.autograd.grad(want, (x, w, b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled, want, rtol=1e-5, atol=0)
    for g, e, c in zip(got_grads, want_grads, torch.autograd.grad(compiled, (x, w, b)),
                       strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_opcheck():
    x, w, b = _inputs((7, 33), 20, True)
    for args in ((x, w, b), (x, w, None)):
        torch.library.opcheck(torch.ops.maskedattn.onednn_linear, args)


def test_steps_aside_under_export():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(10, 16)

    class Module(torch.nn.Module):
        def forward(self, x):
            assert not cpu_linear.serves(x, layer.weight, gemv.MAX_ROWS)
            return F.linear(x, layer.weight, layer.bias)

    exported = torch.export.export(Module(), (x,))
    assert not any("onednn" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), layer(x))
