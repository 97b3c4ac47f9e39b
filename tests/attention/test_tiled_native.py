"""Building and loading the native kernel: variants, the cache, concurrent builds, no compiler."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import maskedattn as ma
from maskedattn.attention import Causal, native
from maskedattn.attention.api import choose_backend
from maskedattn.attention.lowering import lower_call
from tests.helpers import assert_close_to_reference, random_qkv


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty build cache, and no kernel loaded yet in this process."""
    monkeypatch.setenv("MASKEDATTN_CACHE_DIR", str(tmp_path))
    native._load.cache_clear()
    yield tmp_path
    native._load.cache_clear()


def _supported() -> list[str]:
    flags = native.cpu_flags()
    return [v.name for v in native.VARIANTS if v.cpu_flags <= flags]


@pytest.mark.parametrize("variant", [v.name for v in native.VARIANTS])
def test_each_variant_matches_reference(variant, monkeypatch):
    if variant not in _supported():
        pytest.skip(f"this CPU cannot run {variant}")
    monkeypatch.setenv("MASKEDATTN_NATIVE", variant)
    kernel = native.kernel()
    if kernel is None:
        pytest.skip(f"{variant} cannot be built here")
    assert kernel.variant.name == variant
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v = random_qkv(1, 4, 2, 75, 90, 40, dtype=dtype)
        assert_close_to_reference("tiled", q, k, v, mask=Causal(), lse=True)


def test_bad_setting_is_named():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKEDATTN_NATIVE", "sse2")
        with pytest.raises(ValueError, match=r"MASKEDATTN_NATIVE.*sse2"):
            native.kernel()


def test_without_a_compiler_sdpa_serves_what_it_can(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_cache / "no-such-cc"))
    monkeypatch.setenv("PATH", str(fresh_cache))  # no cc or gcc either
    monkeypatch.delenv("MASKEDATTN_NATIVE", raising=False)
    with pytest.warns(RuntimeWarning, match="native CPU attention kernel is unavailable"):
        assert native.kernel() is None
    q, k, v = random_qkv(1, 2, 2, 20, 20, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert native.kernel() is None
        # SDPA serves plain calls: auto takes it, and tiled says how to force its torch path
        call = lower_call(q, k, v, Causal())
        assert choose_backend(call) == "sdpa"
        with pytest.raises(ValueError, match="MASKEDATTN_NATIVE=0"):
            ma.attention(q, k, v, Causal(), backend="tiled")
        # what SDPA cannot do (softcap, the LSE) tiled does in torch, in O(T) memory
        call = lower_call(q, k, v, Causal(), softcap=30.0)
        assert choose_backend(call) == "tiled"
        assert_close_to_reference("tiled", q, k, v, mask=Causal(), softcap=30.0)
        monkeypatch.setenv("MASKEDATTN_NATIVE", "0")
        assert_close_to_reference("tiled", q, k, v, mask=Causal())


def test_built_once_then_reused(fresh_cache, monkeypatch):
    if not _supported():
        pytest.skip("no supported instruction set")
    variant = _supported()[-1]  # the smallest build
    monkeypatch.setenv("MASKEDATTN_NATIVE", variant)
    kernel = native.kernel()
    if kernel is None:
        pytest.skip("cannot build here")
    built = kernel.path.stat().st_mtime_ns
    native._load.cache_clear()
    assert native.kernel().path == kernel.path
    assert kernel.path.stat().st_mtime_ns == built
    assert [p.name for p in fresh_cache.iterdir()] == [kernel.path.name]


def test_concurrent_first_builds_are_safe(fresh_cache):
    """Two processes build into the same empty cache at once: both load a whole library."""
    if not _supported():
        pytest.skip("no supported instruction set")
    variant = _supported()[-1]
    script = (
        "from maskedattn.attention import native; k = native.kernel();"
        " assert k is not None; print(k.path)"
    )
    env = {"MASKEDATTN_CACHE_DIR": str(fresh_cache), "MASKEDATTN_NATIVE": variant}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        if "cannot be built" in err or "unavailable" in err:
            pytest.skip("cannot build here")
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert [p.name for p in fresh_cache.iterdir()] == [os.path.basename(paths.pop())]
