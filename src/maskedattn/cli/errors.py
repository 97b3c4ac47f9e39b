"""How the command line reports a user's mistake: one line, what is wrong and what to do.

Exit status 2 is a usage error (a flag, a value or a path the command cannot take); 1 is a
failure while working (a diverged run, a full disk, memory exhausted). A Python traceback is left
for what is a bug in maskedattn.

:class:`Parser` is ``argparse.ArgumentParser`` that names the closest valid flag or choice for
a misspelled one (``argparse`` does so only from Python 3.14 on, with ``suggest_on_error``).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .._errors import Failure

__all__ = ["FAILURE", "USAGE", "Parser", "UsageError", "describe", "output_directory", "parse",
           "report"]

USAGE = 2
FAILURE = 1


class UsageError(ValueError):
    """A value the user gave that the command cannot take (exit status 2)."""


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors suggest the closest valid flag or choice."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            guess = _closest(str(value), [str(c) for c in action.choices or ()])
            if guess is None or "did you mean" in str(err):
                raise
            raise argparse.ArgumentError(action, f"{err.message}; did you mean"
                                                 f" {guess!r}?") from None

    def unrecognized(self, extras: list[str]) -> None:
        """Exit with a usage error for the ``extras`` this parser does not know."""
        flags = [s for a in self._actions for s in a.option_strings]
        hints = []
        for arg in extras:
            if arg.startswith("-"):
                guess = _closest(arg.split("=", 1)[0], flags)
                if guess is not None:
                    hints.append(f"{arg.split('=', 1)[0]}: did you mean {guess}?")
        self.error(f"unrecognized arguments: {' '.join(extras)}"
                   + (f" ({'; '.join(hints)})" if hints else ""))


def parse(parser: Parser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; unknown flags are reported by the subcommand that was given them."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = _subparser(parser, getattr(args, "command", None))
        (sub or parser).unrecognized(extras)
    return args


def _subparser(parser: argparse.ArgumentParser, name: str | None) -> Parser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return None


def output_directory(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a directory to write into: refused (UsageError) when a file is in the way."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise UsageError(f"{flag} {path}: {p} exists and is not a directory; give a new"
                             " directory or remove the file")
    return path


def _oserror(err: OSError) -> tuple[int, str]:
    where = f"{err.filename}: " if err.filename else ""
    what = err.strerror or str(err)  # ours carry a sentence; the system's a code and a reason
    if isinstance(err, FileExistsError):
        return USAGE, f"{where}exists and is not a directory; give a new path or remove it"
    if isinstance(err, NotADirectoryError):
        return USAGE, f"{where}a part of this path is a file, not a directory"
    if isinstance(err, (FileNotFoundError, IsADirectoryError)):
        return USAGE, f"{where}{what}"
    if isinstance(err, PermissionError):
        return FAILURE, f"{where}permission denied; choose a place you may write to"
    if err.errno == errno.ENOSPC:
        return FAILURE, f"{where}no space left on the device; free some or write elsewhere"
    return FAILURE, f"{where}{what}"


def describe(err: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for an error a user can act on; None for a bug."""
    if isinstance(err, Failure):
        return FAILURE, str(err)
    if isinstance(err, OSError):
        return _oserror(err)
    if isinstance(err, (ValueError, TypeError, ImportError)):
        return USAGE, str(err)
    if isinstance(err, MemoryError):
        return FAILURE, ("out of memory; use a smaller model, --batch-size or --context, or"
                         " --grad-accum")
    if isinstance(err, RecursionError):
        return FAILURE, "input nested too deeply to process"
    if isinstance(err, RuntimeError) and "can't allocate memory" in str(err):
        # torch's CPU allocator; the message names the bytes wanted.
        return FAILURE, (str(err).splitlines()[0] + "; use a smaller model, --batch-size or"
                         " --context, or --grad-accum")
    return None


def report(command: str, run: Callable[[], int | None]) -> int:
    """Run a subcommand; print a user's mistake as one line and return the exit status."""
    try:
        return int(run() or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        described = describe(err)
        if described is None:
            raise
        status, message = described
        message = " ".join(message.split("\n")) if message else type(err).__name__
        print(f"maskedattn {command}: error: {message}", file=sys.stderr)
        return status
