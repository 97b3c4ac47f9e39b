"""The generation benchmark runs end to end (a small model; timings are not checked)."""

import pytest

from maskedattn.cli.main import main

pytest.importorskip("transformers")


def test_quick_run_prints_the_table(capsys):
    assert main(["bench", "generate", "--quick", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "float32 decode tok/s" in out and "same tokens" in out
    assert "float32 prefill 32 ms" in out and "of bandwidth floor" in out


def test_sampled_decoding_adds_a_row(capsys):
    argv = ["bench", "generate", "--quick", "--dtypes", "float32", "--sample", "0.7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "greedy and sampled (T=0.7) generation" in out
    assert "float32 decode tok/s" in out and "float32 sampled tok/s" in out
    assert "temperature 0.7" in out
