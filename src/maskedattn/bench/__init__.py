"""Benchmarks, one module per job, each with ``main(argv)``; ``benchmarks/*.py`` and
``maskedattn bench NAME`` both run them."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``, else a usage error that says so
    (a zero repeat count or an empty prompt would otherwise fail far inside the run)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer is expected, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse
