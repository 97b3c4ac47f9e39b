"""Finding text files and reading them as a stream of blocks, never whole."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["find_files", "read_blocks"]


def find_files(inputs: Sequence[str], suffixes: Sequence[str] | None = None,
               skipped: list[Path] | None = None) -> list[Path]:
    """Files named by ``inputs``: files, directories (searched recursively) or glob patterns.

    Directories keep only files ending in one of ``suffixes`` (all files when None). The result
    is sorted and free of duplicates, so a corpus is read in the same order on every machine.
    Only regular files are read: a FIFO would block forever, a device never end. Those found
    in directories or by patterns are appended to ``skipped``; one named directly is an error.
    """
    found: set[Path] = set()
    others: set[Path] = set()
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            for root, _, names in os.walk(path):
                for name in names:
                    if suffixes is None or name.endswith(tuple(suffixes)):
                        _sort(Path(root) / name, found, others)
        elif path.exists():
            raise ValueError(f"--input {spec}: not a regular file or a directory (a FIFO,"
                             " socket or device cannot be read as a corpus)")
        else:
            before = len(found)
            for match in glob.glob(spec, recursive=True):
                if not Path(match).is_dir():
                    _sort(Path(match), found, others)
            if len(found) == before:
                raise FileNotFoundError(f"--input {spec!r} matches no file")
    if skipped is not None:
        skipped.extend(sorted(others))
    if not found:
        raise FileNotFoundError(f"no input files found in {list(inputs)}")
    return sorted(found)


def _sort(path: Path, regular: set[Path], others: set[Path]) -> None:
    # is_file() follows symbolic links and is true for regular files only.
    (regular if path.is_file() else others).add(path)


def read_blocks(files: Sequence[Path], block_chars: int = 1 << 16,
                errors: str = "replace") -> Iterator[str]:
    """The files' text in blocks of about ``block_chars`` characters, read a block at a time.

    A block ends at the first line end past ``block_chars``; a line longer than twice that is
    cut at its last space before, or else at ``2 * block_chars``: memory stays bounded, a
    single huge line included. An empty string follows each file (the end of a document).
    Bytes that are not UTF-8 are replaced (U+FFFD) rather than stopping a long preparation
    halfway, unless ``errors="surrogateescape"`` keeps them (for a byte tokenizer).
    """
    for path in files:
        with open(path, encoding="utf-8", errors=errors, newline="") as f:
            buffer = ""
            while chunk := f.read(block_chars):
                buffer += chunk
                while len(buffer) >= 2 * block_chars:
                    cut = _cut(buffer, block_chars)
                    yield buffer[:cut]
                    buffer = buffer[cut:]
            while buffer:  # the end of the file: whole lines, then the rest
                end = buffer.find("\n", block_chars - 1)
                cut = end + 1 if end >= 0 else len(buffer)
                yield buffer[:cut]
                buffer = buffer[cut:]
        yield ""


def _cut(text: str, size: int) -> int:
    """Where to end the block at the start of ``text`` (at least ``2 * size`` characters)."""
    end = text.find("\n", size - 1, 2 * size)
    if end >= 0:
        return end + 1
    space = text.rfind(" ", size, 2 * size)
    return space + 1 if space >= 0 else 2 * size
