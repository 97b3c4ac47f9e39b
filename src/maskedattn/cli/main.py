"""``maskedattn``: one command, a subcommand per job. Each lives in its own module of this package,
which defines ``add_parser(subparsers)`` and sets ``func`` on its parser."""

from __future__ import annotations

import importlib
import sys

from .errors import Parser, parse, report

# Subcommands in the order --help lists them; modules of maskedattn.cli.
COMMANDS = ["demo", "explain", "prepare", "train", "generate", "viz", "ablate", "bench"]


def build_parser() -> Parser:
    """The full argument parser, every subcommand included."""
    parser = Parser(
        prog="maskedattn",
        description="Masked (causal) self-attention you can read, inspect and run fast.",
        epilog="Run `maskedattn COMMAND --help` for the options of one command. Exit status: 0"
        " done, 1 failed while working (the message says why), 2 a usage error.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"maskedattn.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = parse(build_parser(), argv)
    # Our errors are written for people: the message, not a traceback (see cli/errors.py).
    return report(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
