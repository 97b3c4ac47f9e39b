"""Inspecting any Hugging Face causal LM: open a directory, label its tokens readably.

:func:`~maskedattn.viz.capture.capture_attention` takes a ``transformers`` model as it takes
ours (its attention then runs through the ``"maskedattn"`` backend, see
:mod:`maskedattn.integrations.transformers`); everything downstream reads the captured maps.
This module adds what a directory needs besides: the model, greedy continuation, and labels
that show a token as the text it stands for.

Byte-level BPE (GPT-2, Llama 3, Qwen2) stores tokens as strings over a printable stand-in
alphabet ("Ġ" for a space); SentencePiece (Llama 2, Mistral) writes "▁" for a space and
``<0x0A>`` for bytes. Labels turn both back into text, with spaces drawn as "␣", line breaks
as "↵", and a token that holds part of a multi-byte character as its bytes (``\\xe4``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import nn

from .._optional import require

__all__ = ["greedy_continuation", "is_transformers_directory", "load_model", "token_label"]


def is_transformers_directory(path: str | Path) -> bool:
    """Whether ``path`` holds a transformers model that our GPT does not load itself."""
    import json

    from ..model import hf, hf_llama

    file = Path(path) / "config.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    kind = meta.get("model_type") if isinstance(meta, dict) else None
    return kind is not None and kind not in (hf.MODEL_TYPE, *hf_llama.MODEL_TYPES)


def load_model(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers causal LM from ``path``, in eval mode, running ``"maskedattn"``."""
    transformers = require("transformers", "inspecting a transformers model")
    from ..integrations.transformers import register

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation=register(), dtype=dtype).eval()


def greedy_continuation(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """The ``n`` tokens a transformers model appends to ``prompt`` by greedy decoding.

    One more token is decoded and dropped, so that the model reads the n-th one too: a
    capture around this call then holds a row for every returned position.
    """
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n + 1,
                         min_new_tokens=n + 1, do_sample=False,
                         pad_token_id=model.generation_config.eos_token_id or 0)
    return out[0, len(prompt):len(prompt) + n].tolist()


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, reversed: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _visible(text: str) -> str:
    text = text.replace(" ", "␣").replace("\n", "↵")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _is_byte_level(tok) -> bool:
    return any("ByteLevel" in repr(part) for part in (tok.decoder, tok.pre_tokenizer))


def token_label(tokenizer, token_id: int) -> str:
    """The text token ``token_id`` stands for, readably (see the module docstring).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or maskedattn's ``HFTokenizer``.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    piece = tok.id_to_token(int(token_id))
    if piece is None:
        return f"<{token_id}>"
    table = _byte_of_char()
    if _is_byte_level(tok) and all(c in table for c in piece):
        data = bytes(table[c] for c in piece)
        return _visible(data.decode("utf-8", errors="backslashreplace")) or "∅"
    byte = _BYTE_TOKEN.fullmatch(piece)
    if byte:
        return _visible(bytes([int(byte.group(1), 16)]).decode("utf-8", "backslashreplace"))
    return _visible(piece.replace("▁", " ")) or "∅"
