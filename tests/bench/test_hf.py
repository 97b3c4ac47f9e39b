"""The transformers benchmark runs end to end (tiny models; timings are not checked)."""

import pytest

from maskedattn.cli.main import main

pytest.importorskip("transformers")


def test_quick_run_prints_the_table(capsys):
    assert main(["bench", "hf", "--quick", "--archs", "llama,gpt2", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "prefill 128 CPU ms" in out and "decode@64 wall tok/s" in out
    assert "TOKENS DIFFER" not in out and out.count("same tokens") == 4


def test_floor_runs_the_model_without_attention(capsys):
    assert main(["bench", "hf", "--quick", "--archs", "llama", "--dtypes", "float32",
                 "--floor"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("llama") and "prefill" in line]
    assert len(rows) == 4 and all("floor/sdpa" in row for row in rows)  # wall, CPU x 2 lengths
