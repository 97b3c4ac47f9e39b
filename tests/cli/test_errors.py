"""A user's mistake ends in one line saying what is wrong and what to do, never a traceback.

Exit status 2 for a usage error, 1 for a failure while working.
"""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
import torch

from maskedattn.cli.main import main
from maskedattn.model import GPT, GPTConfig

TINY = ["--context", "16", "--n-embd", "16", "--n-head", "2", "--n-layer", "1",
        "--vocab-size", "16", "--task-size", "4", "--batch-size", "2", "--eval-batches", "1"]


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.startswith(f"maskedattn {command}: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", n_layer=1, n_head=2, n_embd=16, context=32)).save_pretrained(
        path)
    return path


@pytest.mark.parametrize("command", ["demo", "prepare", "train", "viz"])
def test_out_naming_an_existing_file(command, tmp_path, model_dir, capsys) -> None:
    (tmp_path / "taken").write_text("not a directory\n")
    (tmp_path / "a.txt").write_text("some text\n")
    out = str(tmp_path / "taken")
    argv = {
        "demo": ["demo", "--out", out, "--steps", "1", "--no-progress"],
        "prepare": ["prepare", "--input", str(tmp_path / "a.txt"), "--out", out,
                    "--no-progress"],
        "train": ["train", "--task", "induction", "--steps", "1", "--out", out,
                  "--no-progress", *TINY],
        "viz": ["viz", "--model", str(model_dir), "--text", "ab", "--out", out],
    }[command]
    assert main(argv) == 2
    assert "exists and is not a directory" in one_line_error(capsys, command)


def test_misspelled_flag_names_the_closest(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["train", "--task", "induction", "--stpes", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--stpes" in err and "did you mean --steps?" in err


@pytest.mark.parametrize("argv, wanted", [
    (["trian"], "did you mean 'train'?"),
    (["train", "--task", "inductoin"], "did you mean 'induction'?"),
    (["generate", "--model", "m", "--prompt", "x", "--dtype", "flaot32"],
     "did you mean 'float32'?"),
])
def test_misspelled_choice_names_the_closest(argv, wanted, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert wanted in capsys.readouterr().err


def test_a_context_the_machine_cannot_hold_is_refused_before_training(tmp_path, capsys) -> None:
    (tmp_path / "a.txt").write_text("hello there\n" * 5000)
    assert main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    # Rotary positions: no position table, so nothing large is allocated before the check.
    assert main(["train", "--data", str(tmp_path / "c"), "--context", "4000000",
                 "--positions", "rope", "--batch-size", "64", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = one_line_error(capsys, "train")
    assert "GiB per step" in err and "--grad-accum" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_failures_exit_1_and_usage_errors_2() -> None:
    from maskedattn.cli.errors import describe

    assert describe(OSError(errno.ENOSPC, "No space left on device", "f"))[0] == 1
    assert describe(PermissionError(errno.EACCES, "Permission denied", "f"))[0] == 1
    assert describe(MemoryError())[0] == 1
    assert describe(FileNotFoundError("no checkpoint directory at x")) == (
        2, "no checkpoint directory at x")
    assert describe(ValueError("--lr must be > 0"))[0] == 2
    assert describe(KeyError("a bug")) is None  # bugs keep their traceback


def test_no_traceback_from_the_console_script(tmp_path) -> None:
    # The installed entry point, in a fresh interpreter, as a user runs it.
    result = subprocess.run([sys.executable, "-m", "maskedattn", "generate", "--model",
                             str(tmp_path), "--prompt", "x"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
