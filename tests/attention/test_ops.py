"""The kernels as torch.library operators: opcheck, autograd, vmap, func.grad, autocast, modes."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import maskedattn as ma
from maskedattn.attention.lowering import lower_call, op_args
from tests.attention.mask_cases import MASK_CASES
from tests.helpers import random_qkv, relative_error

HAS_TRITON = importlib.util.find_spec("triton") is not None
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# opcheck runs each op a dozen times: two cases by default, small sizes; the rest are slow.
_SLOW = pytest.mark.slow
OPCHECK_CASES = ["none", "chunked&padding",
                 *(pytest.param(n, marks=_SLOW) for n in ("causal", "documents&causal", "dense",
                                                           "alibi", "bias", "softcap"))]


def _inputs(name: str, b=2, hq=4, hkv=2, tq=7, tk=19, d=8, grad=True):
    q, k, v = random_qkv(b, hq, hkv, tq, tk, d, generator=torch.Generator().manual_seed(0))
    kwargs = MASK_CASES[name](b, hq, tq, tk)
    args = op_args(lower_call(q, k, v, **kwargs))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, args, kwargs


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck_tiled(name):
    q, k, v, args, _ = _inputs(name)
    torch.library.opcheck(torch.ops.maskedattn.tiled_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.maskedattn.tiled_fwd(q, k, v, *args)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.maskedattn.tiled_bwd.default,
                          (d_out, d_lse, *(t.detach() for t in (q, k, v, out, lse)), *args))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", ["causal", pytest.param("chunked&padding", marks=_SLOW)])
def test_opcheck_triton(name):
    q, k, v, args, _ = _inputs(name, tq=5, tk=9, hq=2, hkv=1, b=1)
    # the autograd check compares against a reference gradient: skip the slow numeric part
    torch.library.opcheck(torch.ops.maskedattn.triton_fwd.default, (q, k, v, *args),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    out, lse = torch.ops.maskedattn.triton_fwd(q, k, v, *args)
    torch.library.opcheck(torch.ops.maskedattn.triton_bwd.default,
                          (torch.randn_like(out), None, *(t.detach() for t in (q, k, v, out, lse)),
                           *args), test_utils=("test_schema", "test_faketensor"))


def _projection_views(b=2, t=13, h=3, d=8, dtype=torch.float32):
    """q, k, v as a model makes them: (B, H, T, D) views of one (B, T, 3C) projection."""
    qkv = torch.randn(b, t, 3 * h * d, dtype=dtype, requires_grad=True)
    return tuple(x.view(b, t, h, d).transpose(1, 2) for x in qkv.split(h * d, dim=-1))


@pytest.mark.parametrize("backend", ["tiled", "twin",
                                     pytest.param("triton", marks=pytest.mark.skipif(
                                         not HAS_TRITON, reason="triton is not installed"))])
def test_outputs_keep_the_projection_layout(backend, monkeypatch):
    # Stored as (B, T, H, D), the output's reshape back to (B, T, C) is a view and the
    # gradients reach the projection without a copy each; the fakes report the same strides.
    if backend == "twin":
        monkeypatch.setenv("MASKEDATTN_NATIVE", "0")
    op = "triton" if backend == "triton" else "tiled"
    fwd = getattr(torch.ops.maskedattn, f"{op}_fwd")
    bwd = getattr(torch.ops.maskedattn, f"{op}_bwd")
    q, k, v = _projection_views()
    args = op_args(lower_call(q, k, v, mask=ma.Causal()))
    out, lse = fwd(q, k, v, *args)
    assert out.transpose(1, 2).is_contiguous()
    grads = bwd(torch.randn_like(out), None, q, k, v, out, lse, *args)
    assert all(g.transpose(1, 2).is_contiguous() for g in grads)
    with torch._subclasses.FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (q, k, v, out, lse)]
        fake_out, _ = fwd(*fakes[:3], *args)
        fake_grads = bwd(fakes[3], None, *fakes, *args)
    assert fake_out.stride() == out.stride()
    assert [g.stride() for g in fake_grads] == [g.stride() for g in grads]
    ref = ma.attention(q, k, v, mask=ma.Causal(), backend="reference")
    assert relative_error(out, ref) < 1e-5
    # contiguous inputs keep contiguous outputs
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    assert fwd(qc, kc, vc, *args)[0].is_contiguous()


def test_opcheck_on_projection_views():
    q, k, v = _projection_views(t=7)
    args = op_args(lower_call(q, k, v, mask=ma.Causal()))
    torch.library.opcheck(torch.ops.maskedattn.tiled_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.maskedattn.tiled_fwd(q, k, v, *args)
    torch.library.opcheck(torch.ops.maskedattn.tiled_bwd.default,
                          (torch.randn_like(out), None,
                           *(t.detach() for t in (q, k, v, out, lse)), *args))


def test_double_backward_is_a_clear_error():
    q, k, v, _, kwargs = _inputs("causal")
    out = ma.attention(q, k, v, backend="tiled", **kwargs)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        dq.sum().backward()


@pytest.mark.parametrize("name", ["causal", "padding", "documents", "dense", "alibi", "bias"])
def test_vmap_over_a_leading_dim(name):
    n, b, hq, hkv, tq, tk, d = 3, 2, 4, 2, 5, 11, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, b, h, t, d, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    kwargs = MASK_CASES[name](b, hq, tq, tk)

    def one(q, k, v):
        return ma.attention(q, k, v, backend="tiled", **kwargs)

    got = torch.vmap(one)(q, k, v)
    want = torch.stack([one(q[i], k[i], v[i]) for i in range(n)])
    torch.testing.assert_close(got, want)


def test_vmap_of_grad_and_mapped_slopes():
    n, b, hq, t, d = 2, 1, 2, 6, 8
    q, k, v = (torch.randn(n, b, hq, t, d) for _ in range(3))
    slopes = torch.rand(n, hq)

    def loss(q, k, v, s):
        return ma.attention(q, k, v, ma.Causal(), bias=ma.Alibi(s), backend="tiled").sum()

    got = torch.vmap(torch.func.grad(loss))(q, k, v, slopes)
    want = torch.stack([torch.func.grad(loss)(q[i], k[i], v[i], slopes[i]) for i in range(n)])
    torch.testing.assert_close(got, want)


def test_func_grad_matches_reference():
    q, k, v, _, kwargs = _inputs("chunked&padding", grad=False)

    def loss(backend):
        return lambda q, k, v: ma.attention(q, k, v, backend=backend, **kwargs).square().sum()

    got = torch.func.grad(loss("tiled"), argnums=(0, 1, 2))(q, k, v)
    want = torch.func.grad(loss("reference"), argnums=(0, 1, 2))(
        *(t.double() for t in (q, k, v)))
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 1e-5


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(mode):
    q, k, v, _, kwargs = _inputs("causal", grad=False)
    want = ma.attention(q, k, v, backend="reference", **kwargs)
    with mode():
        got = ma.attention(q, k, v, backend="tiled", **kwargs)
    assert not got.requires_grad
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["tiled", "sdpa", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtype_as_sdpa(backend, dtype):
    q, k, v = random_qkv(1, 2, 2, 9, 9, 16)
    with torch.autocast("cpu", dtype=dtype):
        want = F.scaled_dot_product_attention(q, k.to(dtype), v, is_causal=True)
        got = ma.attention(q, k.to(dtype), v, ma.Causal(), backend=backend)
    assert got.dtype == want.dtype == dtype
    assert relative_error(got, want) < 2e-2


def test_the_operator_itself_follows_autocast():
    q, k, v, args, _ = _inputs("causal", grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = torch.ops.maskedattn.tiled_fwd(q, k.bfloat16(), v, *args)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize("need_lse", [False, True])
@pytest.mark.parametrize("backend", ["tiled", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))])
def test_a_backward_inside_autocast_keeps_the_log_sum_exp_in_float32(backend, need_lse):
    # Autocast casts an operator's floating inputs; the backward's lse and d_lse must stay
    # float32 (the kernel reads them so), as they do when the backward runs outside the region.
    # torch.compile traces a training step's backward inside it, which is how this was found:
    # every gradient upstream of attention came out NaN.
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 3, 3, 40, 40, 16))
    gy = torch.randn(2, 3, 40, 16)
    gl = torch.randn(2, 3, 40)
    # float16 for triton: the CPU interpreter declines bfloat16
    dtype = torch.float16 if backend == "triton" else torch.bfloat16

    def grads(inside: bool):
        with torch.autocast("cpu", dtype=dtype):
            out, lse = ma.attention(q, k, v, ma.Causal(), return_lse=True, backend=backend)
            loss = (out.float() * gy).sum() + ((lse * gl).sum() if need_lse else 0)
            if inside:
                return torch.autograd.grad(loss, (q, k, v))
        return torch.autograd.grad(loss, (q, k, v))

    for got, want in zip(grads(inside=True), grads(inside=False), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", ["tiled", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))])
def test_the_backward_operator_refuses_a_low_precision_log_sum_exp(op):
    q, k, v, args, _ = _inputs("causal", grad=False)
    fwd, bwd = (getattr(torch.ops.maskedattn, f"{op}_{way}") for way in ("fwd", "bwd"))
    out, lse = fwd(q, k, v, *args)
    with pytest.raises(TypeError, match=r"lse.*float32"):
        bwd(out, None, q, k, v, out, lse.bfloat16(), *args)
    with pytest.raises(TypeError, match=r"d_lse.*float32"):
        bwd(out, lse.half(), q, k, v, out, lse, *args)


def test_mixed_dtypes_outside_autocast_still_raise_like_sdpa():
    q, k, v = random_qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(TypeError, match="share one dtype"):
        ma.attention(q, k.bfloat16(), v)


def test_jit_trace_records_the_operator():
    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return ma.attention(q, k, v, ma.Causal())

    q, k, v, _, _ = _inputs("causal", grad=False)
    with pytest.warns(torch.jit.TracerWarning):  # the scale and sizes become constants
        traced = torch.jit.trace(Causal(), (q, k, v))
    assert "maskedattn::tiled_fwd" in str(traced.graph)
    torch.testing.assert_close(traced(q, k, v), Causal()(q, k, v))
