"""prepare: never blocks on a FIFO, splits and bounds a single huge line, keeps bytes, refuses
inputs and settings that would silently give a useless corpus."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from maskedattn.cli.main import main
from maskedattn.data.corpus import read_blocks
from maskedattn.data.shards import TokenShards


def test_a_fifo_in_a_directory_is_skipped_and_reported(tmp_path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text("hello world\n" * 2000)
    os.mkfifo(root / "pipe.txt")
    # Before: prepare opened the FIFO and waited forever for a writer. A fresh process with a
    # timeout, so that a regression fails instead of hanging the test run.
    result = subprocess.run([sys.executable, "-m", "maskedattn", "prepare", "--input",
                             str(root), "--out", str(tmp_path / "c"), "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 not regular files" in result.stdout and "pipe.txt" in result.stdout
    assert main(["prepare", "--input", str(root / "pipe.txt"), "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_a_single_line_file_is_split_into_train_and_validation(tmp_path) -> None:
    line = ("abc def ghi " * 100_000).strip()  # 1.2 MB, no line end
    (tmp_path / "one.txt").write_text(line)
    assert main(["prepare", "--input", str(tmp_path / "one.txt"), "--out",
                 str(tmp_path / "c"), "--no-progress"]) == 0
    train, val = TokenShards(tmp_path / "c", "train"), TokenShards(tmp_path / "c", "val")
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    assert len(train) + len(val) == len(line) + 2  # every byte, and one separator per split


def test_blocks_of_a_huge_line_stay_bounded(tmp_path) -> None:
    (tmp_path / "one.txt").write_text("x" * 100_000 + " " + "y" * 10)
    blocks = list(read_blocks([tmp_path / "one.txt"], block_chars=1000))
    assert max(len(b) for b in blocks) <= 2000
    assert "".join(blocks) == "x" * 100_000 + " " + "y" * 10


def test_the_bytes_tokenizer_keeps_bytes_that_are_not_utf8(tmp_path) -> None:
    data = b"caf\xc3\xa9 \xff\xfe broken \xe2\x82 end\n" * 300
    (tmp_path / "raw.txt").write_bytes(data)
    assert main(["prepare", "--input", str(tmp_path / "raw.txt"), "--out", str(tmp_path / "c"),
                 "--val-fraction", "0", "--no-progress"]) == 0
    tokens = TokenShards(tmp_path / "c", "train")
    got = bytes(int(t) for t in tokens.window(0, len(tokens)) if t != tokens.separator)
    assert got == data  # before: each invalid byte became the three bytes of U+FFFD


@pytest.mark.parametrize("argv, match", [
    (["--tokenizer", "bpe", "--vocab-size", "0"], "--vocab-size must be >= 257"),
    (["--vocab-size", "300"], "does not apply to --tokenizer bytes"),
])
def test_vocab_size_is_never_silently_replaced(tmp_path, capsys, argv, match) -> None:
    (tmp_path / "a.txt").write_text("hello\n" * 100)
    assert main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "c"),
                 "--no-progress", *argv]) == 2
    assert match in capsys.readouterr().err


def test_an_empty_input_is_an_error_not_zero_tokens(tmp_path, capsys) -> None:
    (tmp_path / "empty.txt").write_text("")
    assert main(["prepare", "--input", str(tmp_path / "empty.txt"), "--out",
                 str(tmp_path / "c"), "--no-progress"]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "c" / "manifest.json").exists()
