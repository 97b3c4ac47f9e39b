"""``maskedattn prepare`` on a generated multi-file corpus, with every tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from maskedattn.cli.main import main
from maskedattn.data.shards import TokenShards
from maskedattn.data.tokenizer import load


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = ["def", "return", "class", "self", "value", "import", "für", "größe", "🙂", "x"]
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    texts = []
    for i in range(8):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randrange(3, 12)))
                         for _ in range(rng.randrange(100, 400))) + "\n"
        (root / ("pkg" if i % 2 else "") / f"m{i}.py").write_text(text)
        texts.append(text)
    (root / "data.bin").write_bytes(bytes(range(256)) * 4)  # binary: skipped
    (root / "notes.md").write_text("ignored by --suffix\n")
    return root, texts


@pytest.mark.parametrize("kind", ["bytes", "chars", "bpe"])
def test_prepare_counts_split_and_tokenizer(corpus, tmp_path, kind, capsys) -> None:
    root, texts = corpus
    out = tmp_path / kind
    argv = ["prepare", "--input", str(root), "--suffix", ".py", "--out", str(out),
            "--tokenizer", kind, "--no-progress", *(["--vocab-size", "400"] if kind == "bpe"
                                                    else [])]
    assert main(argv) == 0
    assert "training and" in capsys.readouterr().out
    tok = load(out)
    train, val = TokenShards(out, "train"), TokenShards(out, "val")
    assert isinstance(train._maps[0], np.memmap)
    expected = sum(len(tok.encode(t)) for t in texts)  # blocks end at line ends: same tokens
    separators = sum(int((s.window(0, len(s)) == tok.eot_id).sum()) for s in (train, val))
    assert separators >= len(texts)
    assert len(train) + len(val) - separators == pytest.approx(expected, rel=0.02)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.2
    if kind != "bpe":  # byte and char tokens map back exactly: the split is disjoint and whole
        got = tok.decode([int(t) for s in (train, val) for t in s.window(0, len(s))
                          if t != tok.eot_id])
        assert sorted(got) == sorted("".join(texts))


def test_prepare_errors(tmp_path, capsys) -> None:
    assert main(["prepare", "--input", str(tmp_path / "none*.txt"), "--out", str(tmp_path)]) == 2
    assert "matches no file" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("hello\n")
    assert main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                 "--tokenizer", "sentencepiece"]) == 2
    assert "--tokenizer must be one of" in capsys.readouterr().err
