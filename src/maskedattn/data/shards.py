"""Token shards on disk: written by streaming text, read back memory-mapped.

A prepared corpus is a directory::

    manifest.json     format, dtype, vocabulary size, separator id, shards and their token counts
    train_000.bin     raw little-endian uint16 (vocabularies up to 65536) or uint32 tokens
    val_000.bin

Documents (input files) end with the tokenizer's end-of-text id, so packed training can tell them
apart. Blocks of text (a few KiB, cut at line ends) go to train or validation in a fixed stride
(with a fraction of 0.1: blocks 4, 14, 24, ...): the split is reproducible and disjoint, a single
large file is split too, and nothing is held whole in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["MANIFEST", "TokenShards", "write_shards"]

MANIFEST = "manifest.json"
FORMAT = "maskedattn-tokens"
VERSION = 1


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class _ShardWriter:
    """Appends tokens to numbered shard files of at most ``shard_tokens`` tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._count = 0

    def write(self, tokens: list[int]) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        while arr.size:
            if self._file is None or self._count == self.shard_tokens:
                self._open_next()
            take = min(arr.size, self.shard_tokens - self._count)
            self._file.write(arr[:take].tobytes())
            self._count += take
            self.shards[-1]["tokens"] = self._count
            arr = arr[take:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.out / name, "wb")  # noqa: SIM115 - closed in close()
        self._count = 0
        self.shards.append({"split": self.split, "file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_shards(
    blocks: Iterable[str],
    encode: Callable[[str], list[int]],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    separator: int,
    val_fraction: float = 0.1,
    shard_tokens: int = 2**26,
    tokenizer: dict | None = None,
    progress: Callable[[int], None] | None = None,
    skipped: dict | None = None,
) -> dict:
    """Encode ``blocks`` of text (an iterator: never all in memory) into shards in ``out_dir``.

    An empty string in ``blocks`` marks the end of a document: a separator token is written to
    each split that received part of it.
    ``progress`` is called with the number of characters of each block. ``skipped`` (what the
    caller did not read) is recorded in the manifest. Returns the manifest.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _dtype_for(vocab_size)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    documents = {"train": 0, "val": 0}
    touched: set[str] = set()  # splits that received part of the current document
    index = 0
    try:
        for block in blocks:
            if block == "":
                for split in touched:
                    writers[split].write([separator])
                    documents[split] += 1
                touched.clear()
                continue
            # Block i is held out when (i + 1) * f crosses a half-integer that i * f did not.
            held_out = int((index + 1) * val_fraction + 0.5) > int(index * val_fraction + 0.5)
            split = "val" if held_out else "train"
            index += 1
            touched.add(split)
            writers[split].write(encode(block))
            if progress is not None:
                progress(len(block))
        for split in touched:
            writers[split].write([separator])
            documents[split] += 1
    finally:
        for w in writers.values():
            w.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "separator": separator,
        "tokenizer": tokenizer or {},
        "documents": documents,
        "skipped": skipped or {},
        "shards": writers["train"].shards + writers["val"].shards,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)  # the manifest appears last, and whole
    return manifest


@dataclass(frozen=True)
class Batch:
    """Inputs (B, T), next-token targets (B, T) and document ids (B, T) of each position."""

    tokens: Tensor
    targets: Tensor
    documents: Tensor


class TokenShards:
    """One split of a prepared corpus, memory-mapped: random windows without loading it."""

    def __init__(self, directory: str | os.PathLike, split: str = "train") -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        files = [s for s in self.manifest["shards"] if s["split"] == split and s["tokens"] > 0]
        if not files:
            raise ValueError(f"{self.directory} has no {split!r} tokens; prepare more data or"
                             f" change the validation fraction")
        dtype = np.dtype(self.manifest["dtype"])
        self._maps = []
        for s in files:
            path = self.directory / s["file"]
            size = path.stat().st_size if path.exists() else -1
            if size != s["tokens"] * dtype.itemsize:
                raise ValueError(
                    f"{path} should hold {s['tokens']} tokens ({s['tokens'] * dtype.itemsize}"
                    f" bytes) but {'is missing' if size < 0 else f'has {size} bytes'}: the"
                    " corpus is incomplete or corrupt; run `maskedattn prepare` again"
                )
            self._maps.append(np.memmap(path, dtype=dtype, mode="r"))
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])
        self.separator = int(self.manifest["separator"])
        self.vocab_size = int(self.manifest["vocab_size"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens from global position ``start`` (may span shards)."""
        parts = []
        while length > 0:
            i = int(np.searchsorted(self._starts, start, side="right") - 1)
            local = start - self._starts[i]
            take = min(length, len(self._maps[i]) - local)
            parts.append(np.asarray(self._maps[i][local:local + take]))
            start, length = start + take, length - take
        return np.concatenate(parts).astype(np.int64)

    def sample(self, batch: int, seq_len: int, generator: torch.Generator,
               rows: slice | None = None) -> Batch:
        """``batch`` random windows of ``seq_len`` inputs; ``rows`` keeps a slice of them.

        All ranks of a data-parallel run draw the same global batch from the same generator
        and each keeps its own slice of rows: together they see exactly what one process
        would, and no two ranks read the same window.
        """
        if len(self) < seq_len + 1:
            raise ValueError(f"the split has {len(self)} tokens, fewer than one window of"
                             f" {seq_len + 1}; use a shorter context or more data")
        starts = torch.randint(0, len(self) - seq_len, (batch,), generator=generator).tolist()
        if rows is not None:
            starts = starts[rows]
        return self._batch(starts, seq_len)

    def sequential(self, seq_len: int, batch: int) -> Iterator[Batch]:
        """Consecutive non-overlapping windows covering the split once (for evaluation)."""
        n = (len(self) - 1) // seq_len
        for first in range(0, n, batch):
            yield self._batch([i * seq_len for i in range(first, min(n, first + batch))], seq_len)

    def _batch(self, starts: list[int], seq_len: int) -> Batch:
        windows = torch.from_numpy(np.stack([self.window(s, seq_len + 1) for s in starts]))
        inputs = windows[:, :-1]
        # A document id per position: the separator ends its document, the next token starts
        # a new one.
        ended = (inputs == self.separator).long()
        documents = torch.cumsum(ended, dim=1) - ended
        return Batch(inputs, windows[:, 1:], documents)


def read_manifest(directory: Path) -> dict:
    """The manifest of a prepared corpus, checked; a clear error for anything else."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"{directory} is not a prepared corpus (no {MANIFEST}); create one with"
                         " `maskedattn prepare --input FILES --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON ({err or 'nested too deeply'}); prepare"
                         " the corpus again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a maskedattn token manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')}, this maskedattn reads"
                         f" version {VERSION}")
    return manifest
