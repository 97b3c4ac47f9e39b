"""Build and load the native CPU attention kernel, ``csrc/tiled_attention.c``.

The kernel is compiled on first use, once per instruction set, and loaded by the package's one
loader (:func:`maskedattn._cbuild.load`: hashed names, a checksum verified before every load,
rebuilt when it does not verify, atomic renames). It has no PyTorch headers and links OpenMP
dynamically, so it shares the ``libgomp`` that ``import torch`` has already loaded, and with it
torch's thread pool.

The instruction set is chosen at run time from the CPU's flags: AVX-512 with BF16 dot products,
else AVX-512, else AVX2 + FMA + F16C. ``MASKEDATTN_NATIVE`` (read by
:func:`maskedattn._cbuild.requested_instruction_set`, the same rules as the GEMV kernel's)
overrides the choice:

- unset, ``1`` or ``auto``: the best variant this CPU runs;
- ``0``: no native kernel; the tiled backend runs its pure-torch twin;
- ``avx512bf16``, ``avx512`` or ``avx2``: that variant (to test one on a machine that has more).

Where no variant can be built (no compiler and nothing verified in the cache, not x86-64, no
AVX2), :func:`kernel` returns None and warns once.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import warnings
from pathlib import Path

from .._cbuild import INSTRUCTION_SETS, InstructionSet, choose_instruction_set, cpu_flags, load
from .._cbuild import requested_instruction_set as requested_variant
from .lowering import OP_FIELDS

__all__ = ["VARIANTS", "AttnArgs", "Kernel", "Variant", "View", "cpu_flags", "kernel",
           "requested_variant"]

SOURCE = Path(__file__).with_name("csrc") / "tiled_attention.c"
ABI_VERSION = 4  # must match ABI_VERSION in the C source

#: One build of the kernel: the CPU flags it needs and the compiler flags that target them.
Variant = InstructionSet
VARIANTS = INSTRUCTION_SETS  # best first


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
    want = [ctypes.sizeof(AttnArgs), *(getattr(AttnArgs, f).offset for f in _LAYOUT_PROBES)]
    got = [lib.maskedattn_args_layout(i) for i in range(len(want))]
    if got != want:
        raise OSError(f"{path}: attn_args layout {got} differs from the ctypes mirror's {want}")


class Kernel:
    """The loaded library of one variant."""

    def __init__(self, variant: Variant, lib: ctypes.CDLL) -> None:
        self.variant = variant
        self.path = Path(lib._name)
        self._lib = lib
        if lib.maskedattn_abi_version() != ABI_VERSION:
            raise OSError(f"{self.path} was built for another ABI version")
        _check_layout(lib, self.path)
        #: whether bfloat16 inputs keep bfloat16 products (else they are computed in float32)
        self.bf16 = bool(lib.maskedattn_has_bf16())

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


def kernel() -> Kernel | None:
    """The native kernel that ``MASKEDATTN_NATIVE`` asks for, built if needed; None if none."""
    wanted = requested_variant()
    return None if wanted is None else _load(wanted)


_lock = threading.Lock()


@functools.cache
def _load(wanted: str) -> Kernel | None:
    with _lock:
        try:
            variant = choose_instruction_set(wanted)
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


_ARGS = [ctypes.POINTER(AttnArgs)]
_SYMBOLS = {
    "maskedattn_abi_version": ([], ctypes.c_int), "maskedattn_has_bf16": ([], ctypes.c_int),
    "maskedattn_forward": (_ARGS, ctypes.c_int), "maskedattn_backward": (_ARGS, ctypes.c_int),
    "maskedattn_args_layout": ([ctypes.c_int64], ctypes.c_int64),
}


def _build(variant: Variant) -> ctypes.CDLL:
    """Compile ``variant`` into the cache unless a verified build is there; load it."""
    flags = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", *variant.cc_flags]
    return load(SOURCE, flags, f"tiled_attention_{variant.name}", _SYMBOLS)
