"""The training benchmark runs end to end (a small model; timings are not checked)."""

import pytest

from maskedattn.cli.main import main

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context", "16", "--batch", "2",
         "--repeats", "1", "--warmup", "0"]


def test_quick_run_against_plain_gpt(capsys, monkeypatch):
    monkeypatch.delenv("MASKEDATTN_NANOGPT", raising=False)
    assert main(["bench", "train", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "PlainGPT (SDPA)" in out and "throughput ratio maskedattn / PlainGPT (SDPA)" in out


def test_missing_nanogpt_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"nanoGPT's model\.py"):
        main(["bench", "train", *SMALL, "--nanogpt", str(tmp_path / "model.py")])


@pytest.mark.slow
def test_compiled_run_counts_graph_breaks(capsys, monkeypatch):
    monkeypatch.delenv("MASKEDATTN_NANOGPT", raising=False)
    assert main(["bench", "train", *SMALL, "--compile"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile of maskedattn:" in out and "graph break(s)" in out
    assert "maskedattn eager" in out and "PlainGPT (SDPA) compiled" in out


def test_each_model_in_processes_of_its_own(capsys, monkeypatch):
    monkeypatch.delenv("MASKEDATTN_NANOGPT", raising=False)
    assert main(["bench", "train", *SMALL, "--processes", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "in each of 1 processes per model" in out
    assert "throughput ratio maskedattn / PlainGPT (SDPA)" in out


def test_processes_with_compile_is_refused():
    with pytest.raises(SystemExit):
        main(["bench", "train", *SMALL, "--processes", "1", "--compile"])
