"""Tokenizers: text to token ids and back, saved beside a model.

Every tokenizer has the same small interface: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size``, ``save(directory)``; :func:`load` reads any of them back.

- :class:`ByteTokenizer`: the UTF-8 bytes of the text (ids 0-255) and an end-of-text id (256);
  nothing to train. Any byte string, invalid UTF-8 included, round-trips through
  ``encode_bytes`` / ``decode_bytes``, and through ``decode`` / ``encode`` too: bytes that are
  not UTF-8 decode as lone surrogates (Python's ``surrogateescape``), so no byte is lost.
  :func:`printable` shows such text on a terminal.
- :class:`CharTokenizer`: one id per character seen in a corpus, plus end-of-text and unknown.
- :class:`HFTokenizer`: a Hugging Face ``tokenizers`` tokenizer in its ``tokenizer.json``
  (GPT-2's BPE, or a byte-level BPE trained on a corpus with :func:`train_bpe`).

``eot_id`` is the id that ends a document (``None`` if the tokenizer has none): prepared corpora
put it between documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from .._jsonfile import read_json_object
from .._optional import require

__all__ = ["EOT", "ByteTokenizer", "CharTokenizer", "HFTokenizer", "Tokenizer", "for_model",
           "load", "printable", "train_bpe"]

EOT = "<|endoftext|>"  # GPT-2's name for the end of a document; ours too
UNK = "<|unk|>"

HF_FILE = "tokenizer.json"  # Hugging Face tokenizers' own format
_KEEP_BYTES = "surrogateescape"  # a byte that is not UTF-8 <-> the lone surrogate U+DC00 + byte
OWN_FILE = "maskedattn_tokenizer.json"  # {"type": ...} for tokenizers that are ours


class Tokenizer(Protocol):
    """What the model's users need from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids: every id is in [0, vocab_size)."""
        ...

    @property
    def eot_id(self) -> int | None:
        """The end-of-text id that separates documents, if the tokenizer has one."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        ...

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's file(s) into ``directory`` (created if missing)."""
        ...


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255) and an end-of-text token (256).

    Bytes that are not UTF-8 decode as lone surrogates U+DC80-U+DCFF (``surrogateescape``) and
    encode back to the same bytes: ``encode(decode(ids)) == ids`` for every byte id.
    ``decode_bytes`` gives the bytes themselves.
    """

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` (lone surrogates from :meth:`decode`: their bytes)."""
        return list(text.encode("utf-8", errors=_KEEP_BYTES))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes, valid UTF-8 or not."""
        return list(data)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of ``ids``; end-of-text tokens are dropped."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"byte token ids must lie in [0, {self.vocab_size}), got {bad[:8]}")
        return bytes(i for i in ids if i != self.eot_id)

    def decode(self, ids: Sequence[int]) -> str:
        """The text whose UTF-8 bytes are ``ids``; end-of-text shows as ``<|endoftext|>``.

        Bytes that are not UTF-8 become lone surrogates, which :meth:`encode` turns back into
        the same bytes (write the text with ``errors="surrogateescape"`` to keep them).
        """
        parts, run = [], []
        for i in ids:
            if i == self.eot_id:
                parts += [self.decode_bytes(run).decode("utf-8", errors=_KEEP_BYTES), EOT]
                run = []
            else:
                run.append(i)
        parts.append(self.decode_bytes(run).decode("utf-8", errors=_KEEP_BYTES))
        return "".join(parts)

    def save(self, directory: str | Path) -> None:
        """Write ``maskedattn_tokenizer.json`` saying "bytes"."""
        _write_own(directory, {"type": "bytes"})


class CharTokenizer:
    """One id per character of a vocabulary, then end-of-text and unknown.

    Characters outside the vocabulary encode as the unknown id (and decode as U+FFFD).
    """

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if not all(isinstance(c, str) and len(c) == 1 for c in self.chars):
            raise ValueError("CharTokenizer: the vocabulary must be single characters")
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars)
        self.unk_id = len(self.chars) + 1

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """The characters that occur in ``texts`` (an iterator: one pass, no text kept)."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        """Characters, end-of-text and unknown."""
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        """One id per character (unknown characters: ``unk_id``)."""
        ids = self._ids
        return [ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of ``ids``; end-of-text as ``<|endoftext|>``, unknown as U+FFFD."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"character token ids must lie in [0, {self.vocab_size}),"
                             f" got {bad[:8]}")
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else EOT if i == n else "\ufffd" for i in ids)

    def save(self, directory: str | Path) -> None:
        """Write ``maskedattn_tokenizer.json`` with the characters."""
        _write_own(directory, {"type": "chars", "chars": self.chars})


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind the common interface."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Read a ``tokenizer.json``."""
        tokenizers = require("tokenizers", "reading a tokenizer.json")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as err:  # the Rust side raises a bare Exception for any bad file
            raise ValueError(f"{path} is not a readable tokenizers file: {err}") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        """The id of ``<|endoftext|>`` (GPT-2's, or ours after :func:`train_bpe`)."""
        return self.tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens kept)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / HF_FILE))


def load(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in ``directory``: a ``tokenizer.json`` or one of ours.

    Raises ``FileNotFoundError`` when the directory holds neither.
    """
    directory = Path(directory)
    if (directory / HF_FILE).is_file():
        return HFTokenizer.from_file(directory / HF_FILE)
    own = directory / OWN_FILE
    meta = read_json_object(own, f"{directory} holds no tokenizer ({HF_FILE} or {OWN_FILE})")
    kind = meta.get("type")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "chars":
        chars = meta.get("chars")
        if not isinstance(chars, list):
            raise ValueError(f"{own}: a chars tokenizer needs a list of characters")
        return CharTokenizer(chars)
    raise ValueError(f"{own}: unknown tokenizer type {kind!r}; this maskedattn knows 'bytes'"
                     " and 'chars'")


def printable(text: str) -> str:
    """``text`` for a terminal: bytes that were not UTF-8 shown as ``\\xNN``."""
    return text.encode("utf-8", errors=_KEEP_BYTES).decode("utf-8", errors="backslashreplace")


def for_model(directory: str | Path, vocab_size: int, tokenizer: str | Path | None = None
              ) -> Tokenizer:
    """The tokenizer to use with the model in ``directory`` whose vocabulary has ``vocab_size``.

    ``tokenizer`` (a directory, or a ``tokenizer.json`` file) overrides the one saved beside
    the model; with neither, text is bytes. A tokenizer whose ids do not fit the model's
    vocabulary is refused (``ValueError``) rather than producing wrong ids: a GPT-2 directory
    without its ``tokenizer.json`` would otherwise read text as bytes.
    """
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_file():
            tok = load_file(path)
        elif path.is_dir():
            tok = load(path)
        else:
            raise FileNotFoundError(f"--tokenizer {path}: no such file or directory")
        source = str(path)
    else:
        try:
            tok, source = load(directory), f"the tokenizer in {directory}"
        except FileNotFoundError:
            tok, source = None, None
    how = ("give one with --tokenizer PATH (a directory or a tokenizer.json, e.g. the model's"
           " own from where it was published), or pass token ids with --ids")
    if tok is None:
        if vocab_size > ByteTokenizer.vocab_size:
            raise ValueError(f"{directory} holds no {HF_FILE} (nor {OWN_FILE}), and its"
                             f" vocabulary of {vocab_size} ids is not bytes; {how}")
        return ByteTokenizer()
    # Text never encodes to the byte tokenizer's end-of-text id: a 256-id model reads bytes.
    encodable = 256 if isinstance(tok, ByteTokenizer) else tok.vocab_size
    if encodable > vocab_size:
        raise ValueError(f"{source} has {tok.vocab_size} ids but the model only"
                         f" {vocab_size}: it is not this model's tokenizer; {how}")
    return tok


def load_file(file: str | Path) -> Tokenizer:
    """A tokenizer from one file: a ``tokenizer.json`` or a ``maskedattn_tokenizer.json``."""
    file = Path(file)
    if file.name == OWN_FILE:
        return load(file.parent)
    return HFTokenizer.from_file(file)


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2's scheme) trained on ``texts`` with Hugging Face ``tokenizers``.

    ``texts`` is consumed once, as an iterator. The 256 byte symbols and ``<|endoftext|>`` are
    always in the vocabulary, so any text encodes.
    """
    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be >= 257 for byte-level BPE (256 bytes and"
                         f" end-of-text), got {vocab_size}")
    tk = require("tokenizers", "training a BPE tokenizer")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return HFTokenizer(tokenizer)


def _write_own(directory: str | Path, meta: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OWN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
