"""The tiled CPU backend against the float64 reference and SDPA, on both of its paths: the
native kernel and its pure-torch twin (MASKEDATTN_NATIVE=0)."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskedattn as ma
from maskedattn.attention import (
    Causal,
    Documents,
    Padding,
    PrefixLM,
    SlidingWindow,
    native,
    tiled,
)
from maskedattn.attention.lowering import lower_call
from tests.attention.mask_cases import MASK_CASES, doc_ids
from tests.helpers import ERROR_FLOOR, assert_close_to_reference, random_qkv, relative_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch) -> str:
    """Run the test once with the native kernel and once with the pure-torch twin."""
    if request.param == "torch":
        monkeypatch.setenv("MASKEDATTN_NATIVE", "0")
    else:
        monkeypatch.delenv("MASKEDATTN_NATIVE", raising=False)
        if native.kernel() is None:
            pytest.skip("the native kernel cannot be built here")
    return request.param


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_every_mask_matches_reference(path, name):
    b, hq, hkv, tq, tk, d = 2, 4, 2, 97, 113, 59
    kwargs = MASK_CASES[name](b, hq, tq, tk)
    q, k, v = random_qkv(b, hq, hkv, tq, tk, d)
    assert_close_to_reference("tiled", q, k, v, lse=True, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", [None, Causal(), SlidingWindow(33)], ids=repr)
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "tq", "tk", "d"),
    [
        (1, 2, 2, 1, 1, 16),  # one query, one key
        (2, 3, 3, 113, 113, 64),  # odd T
        (1, 4, 1, 1, 257, 128),  # decoding one token, multi-query
        (1, 4, 2, 40, 97, 16),  # Tq < Tk with grouped queries
    ],
)
def test_shapes_and_dtypes_match_reference(path, dtype, mask, b, hq, hkv, tq, tk, d):
    q, k, v = random_qkv(b, hq, hkv, tq, tk, d, dtype=dtype)
    assert_close_to_reference("tiled", q, k, v, mask=mask, lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_sequence_matches_reference(dtype):
    """Many tiles of the native kernel (the twin's loops would be slow here)."""
    if native.kernel() is None:
        pytest.skip("the native kernel cannot be built here")
    q, k, v = random_qkv(1, 2, 1, 1025, 1025, 64, dtype=dtype)
    assert_close_to_reference("tiled", q, k, v, mask=Causal())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MASK_CASES))
@pytest.mark.parametrize(("tq", "tk", "d"), [(1025, 1025, 64), (97, 1025, 128), (257, 257, 59)])
def test_wide_matrix_matches_reference(path, dtype, name, tq, tk, d):
    b, hq, hkv = 2, 4, 2
    q, k, v = random_qkv(b, hq, hkv, tq, tk, d, dtype=dtype)
    assert_close_to_reference("tiled", q, k, v, lse=True, **MASK_CASES[name](b, hq, tq, tk))


def _grads(backend: str, q, k, v, do, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = ma.attention(q, k, v, backend=backend, **kwargs)
    out.backward(do)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", [None, Causal()], ids=repr)
def test_matches_sdpa(path, dtype, mask):
    """No worse than PyTorch's own kernel, measured against the float64 reference."""
    q, k, v = random_qkv(2, 4, 2, 129, 129, 64, dtype=dtype)
    do = torch.randn(q.shape).to(dtype)
    exact = _grads("reference", q.double(), k.double(), v.double(), do.double(), mask=mask)
    ours = _grads("tiled", q, k, v, do, mask=mask)
    theirs = _grads("sdpa", q, k, v, do, mask=mask)
    for name, e, o, t in zip(("out", "dq", "dk", "dv"), exact, ours, theirs, strict=True):
        err, sdpa_err = relative_error(o, e), relative_error(t, e)
        assert err <= 2 * sdpa_err + ERROR_FLOOR[dtype], f"{name}: {err:.3g} vs sdpa {sdpa_err:.3g}"


def test_rows_that_see_nothing_give_zeros_and_finite_grads(path):
    # Row 0 of batch 1 sees no key (length 0); in batch 0 the window hides keys 0..2 from row 9.
    q, k, v = random_qkv(2, 2, 2, 10, 10, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ma.attention(q, k, v, Padding([10, 0]), backend="tiled", return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_gradient_through_the_lse(path):
    q, k, v = random_qkv(1, 2, 1, 50, 70, 32)
    do, dl = torch.randn(q.shape, dtype=torch.float64), torch.randn(q.shape[:-1]).double()

    def grads(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = ma.attention(*leaves, Causal(), backend=backend, return_lse=True)
        ((out.double() * do).sum() + (lse.double() * dl).sum()).backward()
        return [t.grad for t in leaves]

    exact = grads("reference", torch.float64)
    naive = grads("reference", torch.float32)
    for e, n, o in zip(exact, naive, grads("tiled", torch.float32), strict=True):
        assert relative_error(o, e) <= 2 * relative_error(n, e) + ERROR_FLOOR[torch.float32]


def test_nan_reaches_only_rows_that_see_it(path):
    q, k, v = random_qkv(1, 1, 1, 8, 8, 16)
    k[0, 0, 5, 3] = math.nan
    out = ma.attention(q, k, v, Causal(), backend="tiled")
    assert torch.isnan(out[0, 0, 5:]).all(dim=-1).all()
    assert torch.isfinite(out[0, 0, :5]).all()


def test_strided_inputs(path):
    """q, k, v as views of a (B, T, H, D) projection, as a model produces them."""
    qkv = torch.randn(2, 50, 3, 4, 32)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    assert_close_to_reference("tiled", q, k, v, mask=Causal())


def test_one_thread(path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k, v = random_qkv(1, 2, 2, 70, 70, 32)
        assert_close_to_reference("tiled", q, k, v, mask=Causal())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("blocks", [(16, 16), (32, 48), (128, 256)])
def test_tile_sizes_match_reference(blocks):
    """Tiles smaller and larger than the defaults, every kind of tile, forward and backward,
    on both paths (called directly, with the tile size as an argument)."""
    q, k, v = random_qkv(1, 2, 1, 70, 90, 16)
    do = torch.randn(q.shape)
    call = lower_call(q, k, v, SlidingWindow(20) & Documents(doc_ids(1, 90, 0)), return_lse=True)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = ma.reference_attention(*leaves, call.rule, return_lse=True)
    ref_out.backward(do.double())
    ref = [ref_out, *(t.grad for t in leaves)]
    paths = [(tiled.forward_torch, tiled.backward_torch)]
    kernel = native.kernel()
    if kernel is not None:
        paths.append((functools.partial(tiled.forward_native, kernel),
                      functools.partial(tiled.backward_native, kernel)))
    for forward, backward in paths:
        out, lse = forward(q, k, v, call, blocks=blocks)
        grads = backward(q, k, v, out, lse, do, None, call, blocks=blocks)
        for ours, exact in zip((out, *grads), ref, strict=True):
            assert relative_error(ours, exact) < 1e-5
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse))
        assert relative_error(lse[finite], ref_lse[finite]) < 1e-5


@pytest.mark.parametrize("tq", [1, 5, 113])
def test_native_forward_without_the_lse_gives_the_same_output(tq):
    # Eager inference that does not ask for the LSE passes the kernel no LSE buffer.
    kernel = native.kernel()
    if kernel is None:
        pytest.skip("no native kernel on this machine")
    q, k, v = random_qkv(2, 6, 2, tq, 130, 64)
    call = lower_call(q, k, v, Causal() & Padding(torch.tensor([130, 77])))
    out, lse = tiled.forward_native(kernel, q, k, v, call)
    bare, none = tiled.forward_native(kernel, q, k, v, call, lse=False)
    assert none is None and lse.shape == (2, 6, tq) and torch.equal(out, bare)
    with torch.no_grad():
        assert torch.equal(ma.attention(q, k, v, call.rule, backend="tiled"), out)


MASK_KINDS = ["none", "causal", "window", "prefix", "padding", "documents", "dense"]


@settings(max_examples=25, deadline=None)
@given(
    twin=st.booleans(), b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3),
    tq=st.integers(1, 80), extra=st.integers(0, 40), d=st.integers(1, 70),
    kind=st.sampled_from(MASK_KINDS), window=st.integers(1, 50), seed=st.integers(0, 2**16),
)
def test_property_matches_reference(twin, b, hkv, group, tq, extra, d, kind, window, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKEDATTN_NATIVE", "0" if twin else "auto")
        _check_random_call(b, hkv, group, tq, tq + extra, d, kind, window, seed)


def _check_random_call(b, hkv, group, tq, tk, d, kind, window, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(b, hkv * group, hkv, tq, tk, d, generator=g)
    mask = {
        "none": None, "causal": Causal(), "window": SlidingWindow(window),
        "prefix": PrefixLM(window), "padding": Padding(torch.randint(0, tk + 1, (b,), generator=g)),
        "documents": Documents(doc_ids(b, tk, seed)),
        "dense": torch.rand(b, 1, tq, tk, generator=g) > 0.5,
    }[kind]
    assert_close_to_reference("tiled", q, k, v, mask=mask, lse=True)


# -- what the backend declines -----------------------------------------------------------------


def _call(**changes):
    q, k, v = random_qkv(1, 1, 1, 4, 4, 8)
    return replace(lower_call(q, k, v, None), **changes)


def test_declines_other_devices_and_dtypes():
    assert "CPU" in tiled.why_not(_call(device=torch.device("cuda")))
    assert "float64" in tiled.why_not(_call(dtype=torch.float64))
    assert "bias" in tiled.why_not(_call(bias=torch.zeros(1, 1, 4, 4, requires_grad=True)))


def test_explicit_request_for_float64_raises():
    q, k, v = random_qkv(1, 1, 1, 4, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"tiled.*float64"):
        ma.attention(q, k, v, backend="tiled")


def test_auto_picks_tiled_on_cpu():
    from maskedattn.attention.api import choose_backend

    if native.kernel() is None:
        pytest.skip("without its native kernel tiled leaves these calls to sdpa")
    q, k, v = random_qkv(1, 2, 2, 256, 256, 64)
    call = lower_call(q, k, v, Causal())
    assert choose_backend(call) == "tiled"


# -- memory ------------------------------------------------------------------------------------


def _peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak resident memory grows while ``fn`` runs (Linux)."""
    def peak() -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM"))
        return int(line.split()[1]) * 1024

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak to the current resident size
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    before = peak()
    fn()
    return peak() - before


def test_memory_is_linear_in_t(path):
    """Forward and backward at T = 8192 (native) or 4096 with large tiles (torch twin): the
    T x T score matrix would take 256 or 64 MiB; the tiles take a few MiB."""
    t = 8192 if path == "native" else 4096
    q, k, v = random_qkv(1, 1, 1, t, t, 16)
    call = lower_call(q, k, v, Causal())
    kernel = native.kernel()

    def run():
        do = torch.ones_like(q)
        if path == "native":
            out, lse = tiled.forward_native(kernel, q, k, v, call)
            tiled.backward_native(kernel, q, k, v, out, lse, do, None, call)
        else:
            out, lse = tiled.forward_torch(q, k, v, call, blocks=(256, 256))
            tiled.backward_torch(q, k, v, out, lse, do, None, call, blocks=(256, 256))

    run()  # warm up: first-call allocations, the kernel's build
    scores = 4 * t * t
    assert _peak_rss_growth(run) < scores / 8
