"""``--device`` for the commands that run a saved model (generate, viz, explain)."""

from __future__ import annotations

import argparse
import re

import torch

__all__ = ["add_device_argument", "resolve_device"]

_FORM = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def add_device_argument(parser: argparse.ArgumentParser, *, default: str = "cpu") -> None:
    """Add ``--device`` (cpu, cuda, cuda:N or auto) to ``parser``."""
    parser.add_argument(
        "--device", default=default, metavar="DEVICE",
        help="where the model runs: cpu, cuda (or cuda:N), or auto (cuda when available,"
        f" else cpu); default {default}, whose results are the same on every machine")


def resolve_device(name: str) -> torch.device:
    """The torch device ``--device name`` asks for; ValueError when it is malformed or absent
    (e.g. cuda on a machine or a torch build without CUDA)."""
    name = name.strip().lower()
    if not _FORM.match(name):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is built without CUDA" if torch.version.cuda is None else \
                "torch sees no CUDA GPU"
            raise ValueError(f"--device {name}: no CUDA device is available ({build}); use"
                             " --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s),"
                             f" cuda:0 to cuda:{count - 1}")
    return device
