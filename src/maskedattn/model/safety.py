"""Bounded loading: a checkpoint's config is held against its weights file before anything is built.

A ``config.json`` is a few bytes that may ask for anything (``n_layer`` = 10**7 is a 23 GB
skeleton of modules); the weights file is what the checkpoint really holds. Its safetensors
header (names, dtypes, shapes; at most 100 MB by the format's own limit) is read without a
single tensor, and a config that asks for more layers than the file holds is refused at once.
Everything built after that is bounded by the size of the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

__all__ = ["check_layers", "read_header"]

# safetensors' dtype codes, as torch dtypes (for shape and dtype checks on meta tensors).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
           "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
# The first all-digit part of a dotted name is the layer index in every layout we read:
# blocks.3.attn (ours), transformer.h.3.attn (GPT-2), model.layers.3.self_attn (Llama).
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def read_header(file: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file as meta tensors (name, shape, dtype; no data read).

    Raises ``FileNotFoundError`` if there is no file and ``ValueError`` if it is not a readable
    safetensors file.
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent} holds no {file.name}")
    try:
        with safe_open(str(file), framework="pt") as f:
            entries = [(name, f.get_slice(name)) for name in f.keys()]  # noqa: SIM118 - not a dict
            header = {name: (s.get_dtype(), s.get_shape()) for name, s in entries}
    except Exception as err:  # safetensors raises its own error types for broken files
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
    out = {}
    for name, (code, shape) in header.items():
        dtype = getattr(torch, _DTYPES.get(code, ""), None)
        if dtype is None:
            raise ValueError(f"{file}: tensor {name} has dtype {code}, which maskedattn does"
                             " not read")
        out[name] = torch.empty(shape, dtype=dtype, device="meta")
    return out


def check_layers(n_layer: int, header: dict[str, Tensor], file: Path) -> None:
    """Refuse a config asking for more layers than the weights file can hold.

    Every layer has at least one tensor, so a file of N tensors holds at most N layers: beyond
    that the config is refused before a module is built. Within it, the full check that follows
    lists the missing or unexpected tensors name by name.
    """
    if n_layer > len(header):
        layers = {int(m.group(1)) for m in map(_LAYER.search, header) if m}
        held = f"{len(layers)} (indices {min(layers)}..{max(layers)})" if layers else "no"
        raise ValueError(f"config.json says n_layer={n_layer} but {file} holds {len(header)}"
                         f" tensors, the weights of {held} layers: the config does not belong"
                         " to these weights")
