"""The kernel cache heals itself: corrupt, empty, garbage and wrong libraries are rebuilt.

Every test has its own cache directory. Most build a one-function C file (fast); the last ones
check that the two real kernels (attention, GEMV) follow the same loader and the same reading
of ``MASKEDATTN_NATIVE``.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from maskedattn import _cbuild
from maskedattn.attention import native
from maskedattn.model import gelu, gemv

pytestmark = pytest.mark.skipif(_cbuild._compiler()[0] is None, reason="no C compiler here")

FLAGS = ["-O1", "-shared", "-fPIC"]
SYMBOLS = {"answer": ([], ctypes.c_int)}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("MASKEDATTN_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "answer.c"
    path.write_text("int answer(void) { return 42; }\n")
    return path


def _libraries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.so"))


def _assert_verified(path: Path) -> None:
    """The file's size and hash are those its name records."""
    size, digest = path.stem.rsplit("_", 2)[1:]
    data = path.read_bytes()
    assert len(data) == int(size)
    assert _cbuild._digest(data) == digest


def _no_compiler(tmp_path, monkeypatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    assert _cbuild._compiler()[0] is None


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_library_is_rebuilt(cache, source, damage) -> None:
    path = _cbuild.build(source, FLAGS, "answer")  # built, not loaded: safe to damage
    _assert_verified(path)
    data = path.read_bytes()
    # A truncated library used to kill the process with SIGBUS when it was loaded.
    damaged = {"truncated": data[: len(data) // 2], "empty": b"",
               "garbage": os.urandom(len(data))}[damage]
    path.write_bytes(damaged)
    lib = _cbuild.load(source, FLAGS, "answer", SYMBOLS)
    assert lib.answer() == 42
    [rebuilt] = _libraries(cache)
    assert Path(lib._name) == rebuilt
    _assert_verified(rebuilt)


def test_library_lacking_symbols_is_rebuilt(cache, source, tmp_path) -> None:
    # A library that verifies (its name records its own size and hash) but is not this source's
    # build: it lacks `answer`. It is discarded and rebuilt, with no AttributeError.
    path = _cbuild.build(source, FLAGS, "answer")
    other = tmp_path / "other.c"
    other.write_text("int something_else(void) { return 1; }\n")
    wrong = _cbuild.build(other, FLAGS, "other").read_bytes()
    stem = path.name.rsplit("_", 2)[0]
    impostor = cache / f"{stem}_{len(wrong)}_{_cbuild._digest(wrong)}.so"
    path.unlink()
    impostor.write_bytes(wrong)
    assert _cbuild.build(source, FLAGS, "answer") == impostor  # it does verify
    lib = _cbuild.load(source, FLAGS, "answer", SYMBOLS)
    assert lib.answer() == 42
    assert not impostor.exists()


def test_source_lacking_a_symbol_is_one_clear_error(cache, source) -> None:
    with pytest.raises(RuntimeError, match=r"lacks the symbols \['missing'\]"):
        _cbuild.load(source, FLAGS, "answer", {"missing": ([], None)})


@pytest.mark.parametrize("cached", [True, False])
def test_stale_temporary_files_are_removed(cache, source, cached) -> None:
    if cached:
        _cbuild.build(source, FLAGS, "answer")
    cache.mkdir(exist_ok=True)
    stale = [cache / ".answer_0123.abcd.tmp", cache / ".gemv_4567.efgh.tmp"]  # killed builds
    for path in stale:
        path.write_bytes(b"\x7fELF half a library")
    assert _cbuild.load(source, FLAGS, "answer", SYMBOLS).answer() == 42
    assert not any(path.exists() for path in stale)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_without_a_compiler_a_verified_build_is_used(cache, source, tmp_path, monkeypatch):
    built = _cbuild.build(source, FLAGS, "answer")
    _no_compiler(tmp_path, monkeypatch)
    lib = _cbuild.load(source, FLAGS, "answer", SYMBOLS)
    assert (Path(lib._name), lib.answer()) == (built, 42)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))  # a CC that does not run: the same
    assert _cbuild.build(source, FLAGS, "answer") == built
    # ... but never an unverified one: then the error says why
    built.write_bytes(built.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="holds no verified build of answer"):
        _cbuild.load(source, FLAGS, "answer", SYMBOLS)


@pytest.fixture
def fresh_kernels():
    """No native kernel loaded in this process before or after the test."""
    for library in (native._load, gemv._library, gelu._library):
        library.cache_clear()
    yield
    for library in (native._load, gemv._library, gelu._library):
        library.cache_clear()


def test_the_kernels_share_the_loader_and_work_without_a_compiler(
        cache, tmp_path, monkeypatch, fresh_kernels) -> None:
    if not {"avx2", "fma", "f16c"} <= _cbuild.cpu_flags():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("MASKEDATTN_NATIVE", "avx2")  # the smallest build, for every kernel
    kernel = native.kernel()
    assert kernel is not None and kernel.variant.name == "avx2"
    assert "gemv_avx2_" in gemv.native_status()
    assert "gelu_avx2_" in gelu.native_status()
    built = _libraries(cache)
    assert len(built) == 3
    for path in built:
        _assert_verified(path)
    _no_compiler(tmp_path, monkeypatch)
    for library in (native._load, gemv._library, gelu._library):
        library.cache_clear()
    assert native.kernel().path == kernel.path
    assert gemv._library() is not None and gelu._library() is not None
    assert _libraries(cache) == built


@pytest.mark.parametrize("value", ["", "1", "auto", " Auto "])
def test_native_setting_auto(value, monkeypatch) -> None:
    monkeypatch.setenv("MASKEDATTN_NATIVE", value)
    assert _cbuild.requested_instruction_set() == "auto"


def test_native_setting_is_read_once_for_every_kernel(monkeypatch, fresh_kernels) -> None:
    monkeypatch.setenv("MASKEDATTN_NATIVE", "0")
    assert native.kernel() is None
    assert gemv._library() is None and gelu._library() is None
    assert gemv.native_status() == gelu.native_status() == "disabled by MASKEDATTN_NATIVE=0"
    monkeypatch.setenv("MASKEDATTN_NATIVE", "sse2")
    gemv._library.cache_clear()
    gelu._library.cache_clear()
    for load in (native.kernel, gemv._library, gelu._library):
        with pytest.raises(ValueError, match=r"MASKEDATTN_NATIVE must be .*'sse2'"):
            load()
