"""Build and load the native CPU attention kernel, ``csrc/tiled_attention.c``.

The kernel is compiled on first use, once per instruction set, into the package's kernel cache
(:mod:`maskedattn._cbuild`: hashed names, atomic renames). The library is loaded with ctypes;
it has no PyTorch headers and links OpenMP dynamically, so it shares the ``libgomp``
that ``import torch`` has already loaded, and with it torch's thread pool.

The instruction set is chosen at run time from the CPU's flags: AVX-512 with BF16 dot products,
else AVX-512, else AVX2 + FMA + F16C. ``MASKEDATTN_NATIVE`` overrides the choice:

- unset, ``1`` or ``auto``: the best variant this CPU runs;
- ``0``: no native kernel; the tiled backend runs its pure-torch twin;
- ``avx512bf16``, ``avx512`` or ``avx2``: that variant (to test one on a machine that has more).

Where no variant can be built (no compiler, not x86-64, no AVX2), :func:`kernel` returns None and
warns once.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from .._cbuild import build, cpu_flags
from .lowering import OP_FIELDS

__all__ = ["VARIANTS", "AttnArgs", "Kernel", "Variant", "View", "kernel", "requested_variant"]

SOURCE = Path(__file__).with_name("csrc") / "tiled_attention.c"
ABI_VERSION = 4  # must match ABI_VERSION in the C source


@dataclass(frozen=True)
class Variant:
    """One build of the kernel: the CPU flags it needs and the compiler flags that target them."""

    name: str
    cpu_flags: frozenset[str]
    cc_flags: tuple[str, ...]


_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "fma", "f16c")
# Best first. Flag names are those of /proc/cpuinfo.
VARIANTS = (
    Variant("avx512bf16", frozenset({*_AVX512, "avx512_bf16"}),
            (*(f"-m{f}" for f in _AVX512), "-mavx512bf16")),
    Variant("avx512", frozenset(_AVX512), tuple(f"-m{f}" for f in _AVX512)),
    Variant("avx2", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c")),
)
_BY_NAME = {v.name: v for v in VARIANTS}


class View(ctypes.Structure):
    """Mirror of ``view``: a (B, H, T, D) tensor's data pointer and strides, d contiguous."""

    _fields_ = [("data", ctypes.c_void_p), *((f"s{d}", ctypes.c_int64) for d in "bht")]


# A tensor field of OP_FIELDS is its pointer and then these strides (dimension letters).
_TENSOR_STRIDES = {"lengths": "b", "documents": "b", "dense": "bhqk", "alibi": "", "bias": "bhqk"}
_SCALAR_TYPES = {"bool": ctypes.c_int64, "int": ctypes.c_int64, "float": ctypes.c_double}


def _op_fields() -> list[tuple[str, type]]:
    """The ctypes fields of :data:`.lowering.OP_FIELDS`, as the C struct lays them out."""
    fields: list[tuple[str, type]] = []
    for name, kind in OP_FIELDS:
        if kind == "Tensor?":
            fields.append((name, ctypes.c_void_p))
            fields += [(f"{name}_s{d}", ctypes.c_int64) for d in _TENSOR_STRIDES[name]]
        else:
            fields.append((name, _SCALAR_TYPES[kind]))
    return fields


class AttnArgs(ctypes.Structure):
    """Mirror of ``attn_args`` in the C source, generated: the sizes, the tile kinds, the
    fields of :data:`.lowering.OP_FIELDS`, the tensors. Every field is 8 bytes wide; the
    layout is checked against the C compiler's when the library loads."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in (
            "batch", "q_heads", "kv_heads", "q_len", "k_len", "head_dim", "dtype",
            "block_q", "block_k", "n_threads")),
        ("kinds", ctypes.c_void_p), ("kinds_sb", ctypes.c_int64), ("kinds_sh", ctypes.c_int64),
        *_op_fields(),
        *((name, View) for name in ("q", "k", "v", "out", "d_out", "dq", "dk", "dv")),
        ("lse", ctypes.c_void_p), ("d_lse", ctypes.c_void_p),
    ]


# The fields whose offsets maskedattn_args_layout reports after the size, in its order.
_LAYOUT_PROBES = ("kinds", "causal", "chunk", "dense_sk", "alibi", "softcap", "scale", "q", "dv",
                  "d_lse")


def _check_layout(lib: ctypes.CDLL, path: Path) -> None:
    lib.maskedattn_args_layout.restype = ctypes.c_int64
    lib.maskedattn_args_layout.argtypes = [ctypes.c_int64]
    want = [ctypes.sizeof(AttnArgs), *(getattr(AttnArgs, f).offset for f in _LAYOUT_PROBES)]
    got = [lib.maskedattn_args_layout(i) for i in range(len(want))]
    if got != want:
        raise OSError(f"{path}: attn_args layout {got} differs from the ctypes mirror's {want}")


class Kernel:
    """The loaded library of one variant."""

    def __init__(self, variant: Variant, path: Path) -> None:
        self.variant = variant
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        if self._lib.maskedattn_abi_version() != ABI_VERSION:
            raise OSError(f"{path} was built for another ABI version")
        _check_layout(self._lib, path)
        #: whether bfloat16 inputs keep bfloat16 products (else they are computed in float32)
        self.bf16 = bool(self._lib.maskedattn_has_bf16())
        for name in ("maskedattn_forward", "maskedattn_backward"):
            fn = getattr(self._lib, name)
            fn.argtypes = [ctypes.POINTER(AttnArgs)]
            fn.restype = ctypes.c_int

    def forward(self, args: AttnArgs) -> None:
        """Run the forward pass described by ``args`` (ctypes releases the GIL meanwhile)."""
        self._check(self._lib.maskedattn_forward(ctypes.byref(args)))

    def backward(self, args: AttnArgs) -> None:
        """Run the backward pass described by ``args``."""
        self._check(self._lib.maskedattn_backward(ctypes.byref(args)))

    @staticmethod
    def _check(status: int) -> None:
        if status != 0:
            raise MemoryError("the native attention kernel could not allocate its work space")

    def __repr__(self) -> str:
        return f"Kernel({self.variant.name!r}, {str(self.path)!r})"


def requested_variant() -> str | None:
    """What ``MASKEDATTN_NATIVE`` asks for: "auto", a variant name, or None (no native kernel)."""
    value = os.environ.get("MASKEDATTN_NATIVE", "auto").strip().lower()
    if value in ("", "1", "auto"):
        return "auto"
    if value == "0":
        return None
    if value in _BY_NAME:
        return value
    raise ValueError(
        f"MASKEDATTN_NATIVE must be 0, 1, auto or one of {sorted(_BY_NAME)}, got {value!r}"
    )


def kernel() -> Kernel | None:
    """The native kernel that ``MASKEDATTN_NATIVE`` asks for, built if needed; None if none."""
    wanted = requested_variant()
    return None if wanted is None else _load(wanted)


_lock = threading.Lock()


@functools.cache
def _load(wanted: str) -> Kernel | None:
    with _lock:
        try:
            variant = _choose(wanted)
            return Kernel(variant, _build(variant))
        except (OSError, RuntimeError) as err:
            warnings.warn(
                f"maskedattn: the native CPU attention kernel is unavailable ({err}). The tiled"
                " backend now leaves to PyTorch's SDPA the calls it can serve, and runs its"
                " slower pure-torch path for the others (softcap, returning the LSE). Set"
                " MASKEDATTN_NATIVE=0 to use that path for every call, without this warning.",
                RuntimeWarning, stacklevel=4,
            )
            return None


def _choose(wanted: str) -> Variant:
    flags = cpu_flags()
    if wanted != "auto":
        variant = _BY_NAME[wanted]
        missing = variant.cpu_flags - flags
        if missing:
            raise RuntimeError(f"this CPU lacks {sorted(missing)} for variant {wanted!r}")
        return variant
    for variant in VARIANTS:
        if variant.cpu_flags <= flags:
            return variant
    raise RuntimeError(
        f"no supported instruction set on this CPU ({platform.machine()}): it needs AVX2 + FMA"
        " or AVX-512"
    )


def _build(variant: Variant) -> Path:
    """Compile ``variant`` into the cache unless it is there already; return the library."""
    flags = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", *variant.cc_flags]
    return build(SOURCE, flags, f"tiled_attention_{variant.name}")
