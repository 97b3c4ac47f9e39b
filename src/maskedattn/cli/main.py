"""``maskedattn``: one command, a subcommand per job. Each lives in its own module of this package,
which defines ``add_parser(subparsers)`` and sets ``func`` on its parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommands in the order --help lists them; modules of maskedattn.cli.
COMMANDS = ["demo", "explain", "prepare", "train", "generate", "viz", "ablate", "bench"]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every subcommand included."""
    parser = argparse.ArgumentParser(
        prog="maskedattn",
        description="Masked (causal) self-attention you can read, inspect and run fast.",
        epilog="Run `maskedattn COMMAND --help` for the options of one command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"maskedattn.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        # Our errors are written for people: show the message, not a traceback.
        print(f"maskedattn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
