"""Compiling and loading the package's small C kernels: one loader, one set of rules.

Both native kernels (``attention/csrc``, ``model/csrc``) are single C files with no PyTorch
headers, built by the system C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$MASKEDATTN_CACHE_DIR`` (else ``$XDG_CACHE_HOME/maskedattn``, else ``~/.cache/maskedattn``),
and loaded with ctypes by :func:`load`. The rules, for every kernel:

- **Names.** A library's file name carries a hash of its source, flags and whatever else the
  caller names (the CPU, for ``-march=native``), then a hash of the compiler's version, then the
  library's own size and SHA-256: ``gemv_<source>_<compiler>_<size>_<sha256>.so``. An edit or a
  new compiler builds anew.
- **Verified before loading.** A cached library is loaded only if its size and hash match those
  in its name: a truncated file (which would kill the process with SIGBUS when its pages are
  touched), an empty one or garbage is deleted and rebuilt. So is a library that ctypes cannot
  load or that lacks a symbol the caller needs.
- **Atomic.** A build writes a private temporary file, under a lock on the cache directory, and
  renames it into place; the name, and with it the checksum, appears with the whole file.
  Temporary files left by a killed build are removed the next time the lock is free.
- **No compiler.** Without a (working) compiler, the newest verified build of the same source and
  flags is used, whichever compiler made it.
- **``MASKEDATTN_NATIVE``** (:func:`requested_instruction_set`) is read here only: ``0`` turns
  every native kernel off; unset, ``1`` or ``auto`` builds each for this CPU; an instruction-set
  name (:data:`INSTRUCTION_SETS`) builds each for that set.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no native kernels are built there anyway
    fcntl = None

__all__ = ["INSTRUCTION_SETS", "InstructionSet", "build", "cache_dir", "choose_instruction_set",
           "cpu_flags", "load", "requested_instruction_set"]


@dataclass(frozen=True)
class InstructionSet:
    """A target of the kernels: the CPU flags it needs and the compiler flags that target them."""

    name: str
    cpu_flags: frozenset[str]
    cc_flags: tuple[str, ...]


_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "f16c")
#: Best first. Flag names are those of /proc/cpuinfo.
INSTRUCTION_SETS = (
    InstructionSet("avx512bf16", frozenset({*_AVX512, "avx512_bf16"}),
                   (*(f"-m{f}" for f in _AVX512), "-mavx512bf16")),
    InstructionSet("avx512", frozenset(_AVX512), tuple(f"-m{f}" for f in _AVX512)),
    InstructionSet("avx2", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c")),
)
_BY_NAME = {s.name: s for s in INSTRUCTION_SETS}


def requested_instruction_set() -> str | None:
    """What ``MASKEDATTN_NATIVE`` asks for: "auto", an instruction set's name, or None (no
    native kernels). Raises ``ValueError`` naming the variable for any other value."""
    return _parse_request(os.environ.get("MASKEDATTN_NATIVE", "auto"))


@functools.cache  # read on every attention call, and the variable rarely changes
def _parse_request(raw: str) -> str | None:
    value = raw.strip().lower()
    if value in ("", "1", "auto"):
        return "auto"
    if value == "0":
        return None
    if value in _BY_NAME:
        return value
    raise ValueError(
        f"MASKEDATTN_NATIVE must be 0, 1, auto or one of {sorted(_BY_NAME)}, got {value!r}"
    )


def choose_instruction_set(wanted: str) -> InstructionSet:
    """The instruction set named ``wanted`` (or, for "auto", the best this CPU runs).

    Raises ``RuntimeError`` saying why when this CPU cannot run it.
    """
    flags = cpu_flags()
    if wanted != "auto":
        chosen = _BY_NAME[wanted]
        missing = chosen.cpu_flags - flags
        if missing:
            raise RuntimeError(f"this CPU lacks {sorted(missing)} for variant {wanted!r}")
        return chosen
    for candidate in INSTRUCTION_SETS:
        if candidate.cpu_flags <= flags:
            return candidate
    raise RuntimeError(
        f"no supported instruction set on this CPU ({platform.machine()}): it needs AVX2 + FMA"
        " or AVX-512"
    )


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if "MASKEDATTN_CACHE_DIR" in os.environ:
        return Path(os.environ["MASKEDATTN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "maskedattn"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty off x86-64 Linux)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: ctypes types of a symbol: (argtypes, restype)
Signature = tuple[Sequence[type], type | None]


def load(source: Path, flags: list[str], name: str, symbols: Mapping[str, Signature],
         key_extra: str = "") -> ctypes.CDLL:
    """The library of ``source`` (built by :func:`build`) loaded, with ``symbols`` typed.

    A verified library that ctypes still cannot load, or that lacks one of ``symbols`` (built
    by something else under the same name), is discarded and built once more. Raises
    ``RuntimeError`` saying why when there is no usable library.
    """
    path = build(source, flags, name, key_extra)
    lib, problem = _open(path, symbols)
    if lib is None:
        with _locked(path.parent):
            path.unlink(missing_ok=True)
        path = build(source, flags, name, key_extra)
        lib, problem = _open(path, symbols)
        if lib is None:
            raise RuntimeError(f"{path.name}, built from {source.name}, {problem}")
    for symbol, (argtypes, restype) in symbols.items():
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = list(argtypes), restype
    return lib


def native_library(source: Path, flags: list[str], name: str,
                   symbols: Mapping[str, Signature], fallback: str
                   ) -> tuple[ctypes.CDLL | None, str]:
    """(the library of ``source``, "native kernel PATH"), or (None, why not) when
    ``MASKEDATTN_NATIVE=0`` or no library can be had; ``fallback`` names what runs instead.

    The instruction set is the one ``MASKEDATTN_NATIVE`` asks for (see
    :func:`requested_instruction_set`): "auto" is this CPU's own (``-march=native``, with the
    CPU's flags in the cache key, so that such code never meets another CPU), a name that
    set's variant.
    """
    wanted = requested_instruction_set()
    if wanted is None:
        return None, "disabled by MASKEDATTN_NATIVE=0"
    try:
        if wanted == "auto":
            lib = load(source, [*flags, "-march=native"], name, symbols,
                       key_extra=" ".join(sorted(cpu_flags())))
        else:
            target = choose_instruction_set(wanted)
            lib = load(source, [*flags, *target.cc_flags], f"{name}_{target.name}", symbols)
    except (OSError, RuntimeError) as err:
        return None, f"unavailable, using {fallback}: {err}"
    return lib, f"native kernel {lib._name}"


def _open(path: Path, symbols: Mapping[str, Signature]) -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, what is wrong with it)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"cannot be loaded ({err})"
    missing = [s for s in symbols if not hasattr(lib, s)]
    if missing:
        return None, f"lacks the symbols {missing}"
    return lib, ""


def build(source: Path, flags: list[str], name: str, key_extra: str = "") -> Path:
    """The verified shared library of ``source`` built with ``flags``; compiled unless cached.

    Raises ``RuntimeError`` saying why when there is no compiler (and no verified build) or
    compiling fails.
    """
    directory = cache_dir()
    parts = [source.read_bytes(), " ".join(flags).encode(), key_extra.encode()]
    stem = f"{name}_{hashlib.sha256(bytes(1).join(parts)).hexdigest()[:16]}"
    cc, version, why = _compiler()
    if cc is None:
        found = _verified(directory, stem, "[0-9a-f]{8}")
        if found is None:
            raise RuntimeError(f"{why}, and the cache {directory} holds no verified build of"
                               f" {name}")
        return found
    stem += f"_{hashlib.sha256(version.encode()).hexdigest()[:8]}"
    found = _verified(directory, stem)
    if found is not None:
        if any(directory.glob(".*.tmp")):
            with _locked(directory, wait=False) as locked:
                if locked:
                    _remove_temporary(directory)
        return found
    with _locked(directory):
        _remove_temporary(directory)
        # another process may have built it while this one waited for the lock
        found = _verified(directory, stem, remove_bad=True)
        if found is not None:
            return found
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=".tmp")
        os.close(fd)
        try:
            try:
                result = subprocess.run([cc, *flags, str(source), "-o", tmp],
                                        capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as err:
                raise RuntimeError(f"compiling {source.name} failed: {err}") from err
            if result.returncode != 0:
                tail = result.stderr.strip().splitlines()[-3:]
                raise RuntimeError(f"compiling {name} failed: {' '.join(tail)}")
            data = Path(tmp).read_bytes()
            path = directory / f"{stem}_{len(data)}_{_digest(data)}.so"
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _compiler() -> tuple[str | None, str, str]:
    """(the compiler, its version text, "") or (None, "", why there is none)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "", "no C compiler found (install gcc or set CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, "", f"the C compiler {cc!r} does not run ({err})"
    return cc, version, ""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _verified(directory: Path, stem: str, compiler: str = "", remove_bad: bool = False
              ) -> Path | None:
    """The newest library of ``stem`` (then ``compiler``, a pattern) whose size and hash match
    its name; with ``remove_bad`` (under the lock), those that do not match are deleted."""
    pattern = re.compile(rf"{re.escape(stem)}{'_' + compiler if compiler else ''}"
                         r"_(\d+)_([0-9a-f]{32})\.so")
    good = []
    for path in directory.glob(f"{stem}_*.so"):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        try:
            # the size first: a truncated file is found without reading it
            ok = (path.stat().st_size == int(match[1])
                  and _digest(path.read_bytes()) == match[2])
        except OSError:  # removed meanwhile
            continue
        if ok:
            good.append(path)
        elif remove_bad:
            path.unlink(missing_ok=True)
    return max(good, key=lambda p: p.stat().st_mtime_ns, default=None)


def _remove_temporary(directory: Path) -> None:
    """Temporary files of builds that were killed (only a builder holding the lock has any)."""
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(directory: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the cache directory's lock (an flock on the directory itself, so no lock file);
    yields False if ``wait`` is False and another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield True
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
