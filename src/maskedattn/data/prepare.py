"""Corpus preparation: text files in, a tokenizer and memory-mapped token shards out."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .corpus import find_files, read_blocks
from .shards import write_shards
from .tokenizer import ByteTokenizer, CharTokenizer, Tokenizer, load, train_bpe

__all__ = ["prepare"]

TOKENIZERS = ("bytes", "chars", "bpe")
BLOCK_CHARS = 4096  # the unit of the train/validation split
DEFAULT_BPE_VOCAB = 4096


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(8192)


def make_tokenizer(kind: str, files: Sequence[Path], vocab_size: int | None) -> Tokenizer:
    """``bytes``, ``chars`` or ``bpe`` (trained on ``files``), or a directory with a tokenizer."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "chars":
        return CharTokenizer.train(read_blocks(files))
    if kind == "bpe":
        return train_bpe(read_blocks(files),
                         DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)
    if Path(kind).is_dir():
        return load(kind)
    raise ValueError(f"--tokenizer must be one of {TOKENIZERS} or a directory holding a"
                     f" tokenizer.json, got {kind!r}")


def prepare(inputs: Sequence[str], out: str | os.PathLike, *, tokenizer: str = "bytes",
            vocab_size: int | None = None, val_fraction: float = 0.1,
            suffixes: Sequence[str] | None = None,
            progress: Callable[[int], None] | None = None,
            on_files: Callable[[int], None] | None = None) -> dict:
    """Tokenise the files named by ``inputs`` into ``out``; returns the manifest.

    ``progress`` is called with the characters of each block written; ``on_files`` once with
    the total size in bytes of the files, before writing starts (for a progress bar).
    The manifest's ``skipped`` lists what was not read: ``not_regular`` (FIFOs, sockets,
    devices, broken links) and ``binary`` files.
    """
    if vocab_size is not None and tokenizer != "bpe":
        raise ValueError(f"--vocab-size is the size of a trained BPE; it does not apply to"
                         f" --tokenizer {tokenizer}")
    not_regular: list[Path] = []
    found = find_files(inputs, suffixes, skipped=not_regular)
    files = [f for f in found if not _looks_binary(f)]
    if not files:
        raise FileNotFoundError(f"{list(inputs)} holds no text file")
    if sum(f.stat().st_size for f in files) == 0:
        raise ValueError(f"the input files ({len(files)}) are empty: there is no text to"
                         " tokenise")
    tok = make_tokenizer(tokenizer, files, vocab_size)
    if tok.eot_id is None:
        raise ValueError("the tokenizer has no <|endoftext|> token to separate documents")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    if on_files is not None:
        on_files(sum(f.stat().st_size for f in files))
    # A byte tokenizer keeps bytes that are not UTF-8 (decoded as surrogates, encoded back).
    errors = "surrogateescape" if isinstance(tok, ByteTokenizer) else "replace"
    text_files = set(files)
    return write_shards(
        read_blocks(files, BLOCK_CHARS, errors=errors), tok.encode, out,
        vocab_size=tok.vocab_size, separator=tok.eot_id, val_fraction=val_fraction,
        progress=progress, tokenizer={"kind": type(tok).__name__, "files": len(files)},
        skipped={"not_regular": [str(p) for p in not_regular],
                 "binary": [str(p) for p in found if p not in text_files]},
    )
