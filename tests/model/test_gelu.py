"""The native GELU kernel, forward and backward, against float64 and its twin F.gelu."""

import pytest
import torch
import torch.nn.functional as F

from maskedattn.model import gelu
from maskedattn.model.config import GPTConfig
from maskedattn.model.layers import FeedForward
from tests.helpers import ERROR_FLOOR, relative_error

native = pytest.mark.skipif(gelu._library() is None, reason=gelu.native_status())
FORMS = ["none", "tanh"]
DTYPES = [torch.float32, torch.bfloat16]


def _exact(x, grad, approximate):
    x64 = x.detach().double().requires_grad_()
    y64 = F.gelu(x64, approximate=approximate)
    y64.backward(grad.double())
    return y64.detach(), x64.grad


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", [(1,), (15,), (17,), (113, 257), (3, gelu.MIN_NATIVE + 5)])
def test_matches_float64_as_well_as_torch_does(dtype, approximate, shape):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)  # both tails of the curve
    grad = torch.randn(shape, dtype=dtype)
    want, want_dx = _exact(x, grad, approximate)
    ours = gelu.native_forward(x, approximate)
    ours_dx = gelu.native_backward(grad, x, approximate)
    theirs = F.gelu(x, approximate=approximate)
    theirs_dx = torch.ops.aten.gelu_backward(grad, x, approximate=approximate)
    assert ours.dtype == ours_dx.dtype == dtype and ours.shape == ours_dx.shape == x.shape
    assert relative_error(ours, want) <= 2 * relative_error(theirs, want) + ERROR_FLOOR[dtype]
    assert relative_error(ours_dx, want_dx) <= (2 * relative_error(theirs_dx, want_dx)
                                                + ERROR_FLOOR[dtype])


@native
@pytest.mark.parametrize("approximate", FORMS)
def test_special_values(approximate):
    x = torch.tensor([-60.0, -9.0, -0.0, 0.0, 1e-30, 9.0, 60.0])
    want, want_dx = _exact(x, torch.ones_like(x), approximate)
    ours = gelu.native_forward(x, approximate)
    ours_dx = gelu.native_backward(torch.ones_like(x), x, approximate)
    # absolute: in the far left tail gelu is ~0 (torch returns 0 there, we return ~1e-18)
    torch.testing.assert_close(ours, want.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_dx, want_dx.float(), atol=1e-6, rtol=1e-6)
    odd = torch.tensor([float("nan"), -float("inf"), float("inf")])
    # gelu(-inf) = -inf * 0 and gelu'(+-inf) are NaN, as torch gives them; gelu(+inf) is +inf
    # (torch's exact form computes inf * (1 + erf(inf)) / 2 and returns NaN there).
    y = gelu.native_forward(odd, approximate)
    assert y[:2].isnan().all() and y[2] == float("inf")
    assert gelu.native_backward(torch.ones(3), odd, approximate).isnan().all()
    assert torch.ops.aten.gelu_backward(torch.ones(3), odd, approximate=approximate).isnan().all()


@native
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(dtype):
    x = torch.randn(5, gelu.MIN_NATIVE + 3, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gelu.native_forward(x, "none"), gelu.native_backward(x, x, "tanh")
        torch.set_num_threads(2)
        two = gelu.native_forward(x, "none"), gelu.native_backward(x, x, "tanh")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", FORMS)
def test_gelu_takes_the_kernel_and_its_gradients_match_torch(dtype, approximate):
    x = torch.randn(4, gelu.MIN_NATIVE // 2, dtype=dtype, requires_grad=True)
    assert gelu.serves(x, approximate)
    grad = torch.randn_like(x)
    (dx,) = torch.autograd.grad(gelu.gelu(x, approximate), x, grad)
    _, want_dx = _exact(x, grad, approximate)
    theirs_dx = torch.ops.aten.gelu_backward(grad, x.detach(), approximate=approximate)
    tol = 2 * relative_error(theirs_dx, want_dx) + ERROR_FLOOR[dtype]
    assert relative_error(dx, want_dx) <= tol


@native
def test_a_double_backward_is_torch_s_differentiable_one():
    x = torch.randn(2, gelu.MIN_NATIVE, dtype=torch.float64).float().requires_grad_()
    (dx,) = torch.autograd.grad(gelu.gelu(x, "tanh").sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sum(), x)
    x2 = x.detach().requires_grad_()
    (want_dx,) = torch.autograd.grad(F.gelu(x2, approximate="tanh").sum(), x2, create_graph=True)
    (want_ddx,) = torch.autograd.grad(want_dx.sum(), x2)
    torch.testing.assert_close(ddx, want_ddx)


def test_small_strided_or_other_tensors_stay_with_torch():
    big = torch.randn(2, gelu.MIN_NATIVE)
    assert not gelu.serves(torch.randn(1, 3072))  # a decoding step's row
    assert not gelu.serves(big.t())
    assert not gelu.serves(big.double())
    assert not gelu.serves(big, "sigmoid")
    assert not gelu.serves(torch.nn.Parameter(big))  # a subclass keeps its own dispatch
    with torch.no_grad():
        y = gelu.gelu(big.t(), "tanh")
    torch.testing.assert_close(y, F.gelu(big.t(), approximate="tanh"))


@native
def test_the_operators_pass_opcheck():
    x = torch.randn(3, 257, requires_grad=True)
    for approximate in FORMS:
        torch.library.opcheck(torch.ops.maskedattn.gelu, (x, approximate))
        torch.library.opcheck(torch.ops.maskedattn.gelu_backward,
                              (torch.randn(3, 257), x.detach(), approximate))
    with pytest.raises(ValueError, match="approximate"):
        torch.ops.maskedattn.gelu(x, "sigmoid")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        torch.ops.maskedattn.gelu(x.double(), "tanh")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        gelu.native_forward(x.double())
    with pytest.raises(ValueError, match="one shape and dtype"):
        gelu.native_backward(x.detach().bfloat16(), x.detach())


@native
@pytest.mark.parametrize("kind", ["gelu", "gelu_exact"])
def test_compiled_feed_forward_keeps_the_native_operators(kind):
    # inductor's own GELU made compiled training steps slower (BENCHMARKS.md): the compiled
    # graph keeps the operators wherever eager runs them, with their values and gradients
    torch.manual_seed(0)
    mlp = FeedForward(GPTConfig.preset("tiny", n_embd=64, mlp=kind))
    x = torch.randn(4, 300, 64, requires_grad=True)
    explained = torch._dynamo.explain(mlp)(x)
    assert explained.graph_break_count == 0
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert any("maskedattn.gelu" in op for op in ops) is gelu.serves(
        torch.empty(4, 300, 256), mlp.approximate), ops
    grad = torch.randn(4, 300, 64)
    want = mlp(x)
    want_dx, = torch.autograd.grad(want, x, grad)
    got = torch.compile(mlp, fullgraph=True)(x)
    got_dx, = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-6)


def test_each_pass_takes_the_faster_implementation(monkeypatch):
    x = torch.randn(2, gelu.MIN_NATIVE)
    for setting, exact in (("auto", None), ("avx2", False)):
        monkeypatch.setenv("MASKEDATTN_NATIVE", setting)
        gelu._library.cache_clear()
        if gelu._library() is None:
            continue
        wide = gelu._library().gelu_lanes() >= 16
        assert gelu.serves(x, "tanh") and gelu.serves(x.bfloat16(), "tanh")
        # the exact form: the kernel's with AVX-512 (its bfloat16 forward excepted), torch's
        # with AVX2
        assert gelu._native_passes(torch.float32, "none") == (wide, wide)
        assert gelu._native_passes(torch.bfloat16, "none") == (False, wide)
        assert gelu.serves(x, "none") is wide
        if exact is not None:
            assert wide is exact
        torch.testing.assert_close(torch.ops.maskedattn.gelu(x, "none"), F.gelu(x))
    monkeypatch.setenv("MASKEDATTN_NATIVE", "0")
    gelu._library.cache_clear()
    assert not gelu.serves(x, "tanh")
    assert gelu.native_status() == "disabled by MASKEDATTN_NATIVE=0"
    torch.testing.assert_close(torch.ops.maskedattn.gelu(x, "tanh"),
                               F.gelu(x, approximate="tanh"))
    monkeypatch.undo()
    gelu._library.cache_clear()


@native
def test_export_vmap_func_grad_and_inference_mode_see_torch_s_gelu_or_agree_with_it():
    x = torch.randn(3, gelu.MIN_NATIVE + 1)
    want = F.gelu(x, approximate="tanh")

    class Module(torch.nn.Module):
        def forward(self, t):
            return gelu.gelu(t, "tanh")

    program = torch.export.export(Module(), (x,))
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert ops == ["aten.gelu.default"]
    torch.testing.assert_close(program.module()(x), want)
    torch.testing.assert_close(torch.vmap(Module())(x[:, None]), want[:, None])
    grad = torch.func.grad(lambda t: gelu.gelu(t, "tanh").sum())(x)
    want_grad = torch.func.grad(lambda t: F.gelu(t, approximate="tanh").sum())(x)
    torch.testing.assert_close(grad, want_grad)
    with torch.inference_mode():
        torch.testing.assert_close(gelu.gelu(x, "tanh"), want)
