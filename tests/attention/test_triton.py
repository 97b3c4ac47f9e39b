"""The Triton backend against the float64 reference, forward and gradients.

On a machine with a CUDA GPU the kernels run compiled. Without one they run in Triton's CPU
interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is set below, before the kernels module is
first imported (the backend imports it lazily), and the kernels then use 32 x 16 tiles so that
short sequences still cross tile, window, document and padding boundaries.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskedattn as ma
from maskedattn.attention import (
    Causal,
    DenseMask,
    Padding,
    SlidingWindow,
)
from maskedattn.attention.api import choose_backend
from tests.attention.mask_cases import MASKS, SCORES
from tests.helpers import assert_close_to_reference, random_qkv, relative_error

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA or not HAS_TRITON, reason="needs a CUDA GPU and triton")

# float32 goes through the tensor cores as tf32 on a GPU (10 mantissa bits, operands truncated):
# measured errors reach 5e-3 on these inputs, against 1e-7 for true float32. Documented.
TF32_TOLERANCE = 1e-2


@pytest.fixture(autouse=True, scope="module")
def _fixed_tiles():
    """Compile one tile config per kernel variant instead of autotuning (GPU runs only)."""
    if not HAS_TRITON:
        yield
        return
    from maskedattn.attention import _triton_kernels

    before, _triton_kernels.AUTOTUNE = _triton_kernels.AUTOTUNE, False
    yield
    _triton_kernels.AUTOTUNE = before


def check(q, k, v, grads: bool = True, **kwargs) -> None:
    """Forward, LSE and (by default) dq/dk/dv of the triton backend against float64."""
    # With a single key the softmax is constant: dq and dk are exactly 0 in the reference,
    # and any rounding would count as an infinite relative error.
    grads = grads and k.shape[2] > 1
    if q.dtype == torch.float32 and q.is_cuda:
        _check_tf32(q, k, v, grads, **kwargs)
    else:
        assert_close_to_reference("triton", q, k, v, grads=grads, lse=True, **kwargs)


def _check_tf32(q, k, v, grads: bool, **kwargs) -> None:
    do = torch.randn_like(q)
    results = []
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = ma.attention(*leaves, backend=backend, return_lse=True, **kwargs)
        out.backward(do.to(dtype))
        results.append([out, lse] + [t.grad for t in leaves])
    names = ("out", "lse", "dq", "dk", "dv")[: 5 if grads else 2]
    for name, ref, ours in zip(names, *results, strict=False):
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(ours)), f"{name}: -inf rows differ"
        err = relative_error(ours[finite], ref[finite])
        assert err <= TF32_TOLERANCE, f"triton {name} (tf32): relative error {err:.3g}"


def qkv(b=2, hq=2, hkv=1, tq=97, tk=97, d=16, dtype=torch.float32):
    return random_qkv(b, hq, hkv, tq, tk, d, dtype=dtype, device=DEVICE)


# Combinations whose parts have cases of their own: the interpreter is slow, so only with -m slow.
_SLOW_IN_INTERPRETER = {"chunked&padding", "dense&window&padding"}


def _on_device(kwargs: dict) -> dict:
    """A MASK_CASES entry with its bias tensor on the test device (masks move themselves)."""
    bias = kwargs.get("bias")
    return {**kwargs, "bias": bias.to(DEVICE)} if isinstance(bias, torch.Tensor) else kwargs


@needs_triton
@pytest.mark.parametrize("tq,tk", [(97, 97), (17, 97), (5, 97)], ids=["self", "tq<tk", "decode"])
@pytest.mark.parametrize("mask", [
    pytest.param(m, marks=pytest.mark.slow) if m in _SLOW_IN_INTERPRETER and not CUDA else m
    for m in MASKS])
def test_every_mask(mask, tq, tk):
    q, k, v = qkv(tq=tq, tk=tk)
    check(q, k, v, **_on_device(MASKS[mask](2, 2, tq, tk)))


@needs_triton
@pytest.mark.parametrize("tq", [97, 3])
@pytest.mark.parametrize("case", list(SCORES))
def test_scores(case, tq):
    q, k, v = qkv(tq=tq, tk=97)
    check(q, k, v, **_on_device(SCORES[case](2, 2, tq, 97)))


@needs_triton
@pytest.mark.parametrize("t", [1, 17, 97])
@pytest.mark.parametrize("d", [16, 64, 40])
def test_sizes(t, d):
    q, k, v = qkv(b=1, hq=2, hkv=2, tq=t, tk=t, d=d)
    check(q, k, v, mask=Causal())


@needs_triton
@pytest.mark.parametrize("hq,hkv,tq", [(6, 1, 33), (6, 3, 33), (8, 2, 16), (4, 1, 1)])
def test_grouped_query_attention(hq, hkv, tq):
    q, k, v = qkv(b=1, hq=hq, hkv=hkv, tq=tq, tk=70)
    check(q, k, v, mask=Causal())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter multiplies bfloat16 tiles as raw integers")
    q, k, v = qkv(tq=97, tk=97, dtype=dtype)
    check(q, k, v, mask=Causal())


@needs_triton
def test_decode_merges_splits_of_a_long_cache():
    # 3 queries x 4 heads per key/value head: one packed tile; many splits of the keys.
    q, k, v = qkv(b=2, hq=8, hkv=2, tq=3, tk=150)
    for mask in (Causal(), SlidingWindow(40), Padding([150, 45])):
        check(q, k, v, mask=mask)


@needs_triton
def test_rows_that_see_nothing_output_zero_with_zero_grads():
    q, k, v = qkv(b=2, hq=2, hkv=2, tq=20, tk=40)
    mask = torch.ones(2, 1, 20, 40, dtype=torch.bool)
    mask[0, :, 3] = False  # one row sees no key
    for m in (Padding([0, 25]), DenseMask(mask)):
        check(q, k, v, mask=m)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = ma.attention(*leaves, mask=m, backend="triton", return_lse=True)
        empty = torch.isinf(lse)
        assert empty.any() and (out[empty] == 0).all() and (lse[empty] < 0).all()
        out.sum().backward()
        assert (leaves[0].grad[empty] == 0).all()
        assert all(torch.isfinite(t.grad).all() for t in leaves)


@needs_triton
def test_gradient_through_the_lse():
    q, k, v = qkv(b=1, hq=2, hkv=1, tq=33, tk=50)
    grads = []
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = ma.attention(*leaves, mask=Causal(), backend=backend, return_lse=True)
        (out.sum() + 0.5 * lse.sum()).backward()
        grads.append([t.grad for t in leaves])
    for ref, ours in zip(*grads, strict=True):
        assert relative_error(ours, ref) < (TF32_TOLERANCE if CUDA else 1e-5)


@needs_triton
def test_strided_inputs_and_gradient():
    # (B, T, H, D) memory seen as (B, H, T, D), and a broadcast output gradient.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(tq=45, tk=45))
    assert not q.is_contiguous()
    check(q, k, v, mask=Causal())
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ma.attention(*leaves, mask=Causal(), backend="triton").sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@needs_triton
def test_backward_is_deterministic():
    q, k, v = qkv(b=1, hq=4, hkv=1, tq=64, tk=64)
    runs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        ma.attention(*leaves, mask=Causal(), backend="triton").square().sum().backward()
        runs.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    tq=st.integers(1, 40), extra=st.integers(0, 40), d=st.sampled_from([16, 24, 32]),
    group=st.sampled_from([1, 2]), window=st.one_of(st.none(), st.integers(1, 50)),
    softcap=st.one_of(st.none(), st.floats(0.5, 5.0)),
)
def test_property_matches_reference(tq, extra, d, group, window, softcap):
    q, k, v = qkv(b=1, hq=2 * group, hkv=2, tq=tq, tk=tq + extra, d=d)
    mask = Causal() if window is None else SlidingWindow(window)
    check(q, k, v, grads=False, mask=mask, softcap=softcap)


# -- the kernels' parameters follow the lowering ------------------------------------------------


@needs_triton
def test_mask_params_follow_op_fields():
    """A field added to OP_FIELDS that the kernels do not lower fails loudly, naming it."""
    from maskedattn.attention import _triton_kernels as tk
    from maskedattn.attention.lowering import OP_FIELDS, lower_call

    assert tk._mask_params(OP_FIELDS) == tk.MASK_PARAMS
    with pytest.raises(RuntimeError, match=r"'sink'\].*_LOWERED"):
        tk._mask_params((*OP_FIELDS, ("sink", "int")))
    q, k, v = qkv(tq=17, tk=40)
    for name, make in {**MASKS, **SCORES}.items():
        args = tk._mask_args(lower_call(q, k, v, **_on_device(make(2, 2, 17, 40))))
        assert tuple(args) == tk.MASK_PARAMS, name


@needs_triton
def test_a_kernel_not_ending_with_the_mask_params_fails_the_check():
    import triton
    import triton.language as tl

    from maskedattn.attention import _triton_kernels as tk

    @triton.jit
    def stale(X, CAUSAL: tl.constexpr, window, prefix):  # the mask of an older lowering
        pass

    with pytest.raises(RuntimeError, match="stale takes the parameters"):
        tk._check_mask_params(stale)
    # the right names, but a flag that is not constexpr
    loose = SimpleNamespace(arg_names=list(tk.MASK_PARAMS),
                            fn=SimpleNamespace(__annotations__={}, __name__="loose"))
    with pytest.raises(RuntimeError, match=r"loose .*\(constexpr: \[\]\)"):
        tk._check_mask_params(loose)


# -- choosing the backend ----------------------------------------------------------------------


def _call(dtype=torch.float32, d=16, bias=None, device=DEVICE):
    q, k, v = random_qkv(1, 2, 2, 8, 8, d, dtype=dtype, device=device)
    if bias is not None:
        q.requires_grad_()
    from maskedattn.attention.lowering import lower_call

    return lower_call(q, k, v, bias=bias)


@needs_triton
@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: _call(dtype=torch.float64), "float64"),
        (lambda: _call(d=264), "D=264"),
        (lambda: _call(bias=torch.zeros(8, 8, requires_grad=True, device=DEVICE)), "bias"),
    ],
)
def test_explicit_backend_says_why_not(make, words):
    with pytest.raises(ValueError, match="backend 'triton' cannot serve this call") as err:
        choose_backend(make(), "triton")
    assert words in str(err.value)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = importlib.import_module("maskedattn.attention.triton").why_not(_call(device="cpu"))
    expected = "CUDA" if HAS_TRITON else "not installed"
    assert reason is not None and expected in reason


def test_without_triton_the_backend_says_so(monkeypatch):
    backend = importlib.import_module("maskedattn.attention.triton")
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    assert "triton is not installed" in backend.why_not(_call(device="cpu"))


def test_auto_never_picks_triton_for_cpu_tensors():
    assert choose_backend(_call(device="cpu")) != "triton"


@needs_cuda
def test_auto_picks_triton_on_cuda():
    assert choose_backend(_call(dtype=torch.bfloat16)) == "triton"


@needs_cuda
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_every_tile_config_on_the_gpu(kernel, monkeypatch):
    """Autotuning may pick any config: each must compute the same function."""
    from triton.runtime.errors import OutOfResources

    from maskedattn.attention import _triton_kernels as tk

    default = tk._choices
    passed = set()
    for d in (64, 128, 256):
        _, configs, wide = tk._KERNELS[kernel]
        for config in configs if d <= 128 else [wide]:
            def choices(name, block_d, config=config):
                return [config] if name == kernel else default(name, block_d)[:1]

            monkeypatch.setattr(tk, "_choices", choices)
            q, k, v = qkv(b=2, hq=4, hkv=2, tq=300, tk=333, d=d, dtype=torch.bfloat16)
            try:
                check(q, k, v, mask=Causal() & Padding([333, 200]))
            except OutOfResources:  # too big for this head dim: autotuning skips it too
                continue
            passed.add(d)
    assert passed == {64, 128, 256}


# -- the wide matrix ---------------------------------------------------------------------------


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 17, 97, 113, 257])
@pytest.mark.parametrize("d", [16, 32, 64, 96, 128])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wide_matrix(dtype, mask, d, t, request):
    if "slow" not in request.config.option.markexpr:
        pytest.skip("the wide matrix runs only when asked for: pytest -m slow")
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter multiplies bfloat16 tiles as raw integers")
    for tq in sorted({t, max(1, t // 4)}):
        q, k, v = qkv(b=2, hq=4, hkv=2, tq=tq, tk=t, d=d, dtype=dtype)
        check(q, k, v, **_on_device(MASKS[mask](2, 4, tq, t)))


@needs_triton
def test_backward_reads_a_sliced_lse_by_its_rows() -> None:
    """The ring hands the backward a row slice of a longer LSE (not contiguous): the gradients
    must be those of the contiguous copy (they were garbage before the kernel copied it)."""
    from maskedattn.attention import lower_call, ops
    from maskedattn.attention.lowering import op_args

    q, k, v = random_qkv(1, 2, 2, 40, 40, 16, device=DEVICE)
    do = torch.randn_like(q)
    args = op_args(lower_call(q, k, v, Causal()))
    out, lse = ops.flash_forward("triton", q, k, v, args)
    wide = torch.full((1, 2, 56), float("nan"), device=DEVICE)
    wide[:, :, 8:48] = lse
    sliced = wide[:, :, 8:48]
    assert not sliced.is_contiguous()
    want = ops.flash_backward("triton", do, None, q, k, v, out, lse, args)
    got = ops.flash_backward("triton", do, None, q, k, v, out, sliced, args)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
