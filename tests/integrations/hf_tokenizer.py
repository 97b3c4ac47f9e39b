"""A byte-level BPE tokenizer trained in the test itself: nothing downloads."""

from __future__ import annotations

import pytest


def byte_bpe(vocab_size: int, text: str):
    """A GPT-2-style byte-level BPE ``tokenizers.Tokenizer`` with ``<|endoftext|>``, trained
    on ``text`` repeated."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 30, trainer)
    return tok
