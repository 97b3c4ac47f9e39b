"""Honest training: divergence stops the run, nonsense settings are refused at the start,
and the validation loss does not depend on --grad-accum."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from maskedattn.cli.main import main
from maskedattn.model import GPT, GPTConfig
from maskedattn.train import checkpoint as ckpt
from maskedattn.train.config import TrainConfig
from maskedattn.train.loop import _Source, evaluate

TINY = (("context", 32), ("n_embd", 32), ("n_head", 2), ("n_layer", 2), ("vocab_size", 32))
FLAGS = ["--context", "32", "--n-embd", "32", "--n-head", "2", "--n-layer", "2",
         "--vocab-size", "32", "--task-size", "8", "--batch-size", "4", "--eval-batches", "1"]


def test_a_diverged_run_stops_with_an_error_and_no_nan_checkpoint(tmp_path, capsys) -> None:
    # The command: before, every step logged loss 0.0 and the run exited 0.
    out = tmp_path / "run"
    status = main(["train", "--task", "induction", "--lr", "1e6", "--min-lr", "0", "--warmup",
                   "0", "--steps", "30", "--eval-every", "1", "--out", str(out),
                   "--no-progress", *FLAGS])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "training diverged at step" in err and "Traceback" not in err
    assert "--lr" in err  # says what to do
    for step_dir in ckpt.list_checkpoints(out):  # whatever was written holds finite weights
        for name, t in load_file(step_dir / "model.safetensors").items():
            assert torch.isfinite(t).all(), (step_dir, name)
    metrics = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
    assert '"loss": 0.0' not in metrics


@pytest.mark.parametrize("flag, value", [
    ("--grad-clip", "nan"), ("--grad-clip", "-1"), ("--lr", "0"), ("--lr", "-0.001"),
    ("--lr", "inf"), ("--lr", "nan"), ("--min-lr", "-1"), ("--min-lr", "1"),
    ("--warmup", "-1"), ("--steps", "0"), ("--beta1", "1"), ("--beta2", "nan"),
    ("--weight-decay", "nan"), ("--seed", "-1"), ("--seed", str(2**64)), ("--keep", "0"),
])
def test_nonsense_settings_are_refused_at_the_start(flag, value, tmp_path, capsys) -> None:
    assert main(["train", "--task", "induction", "--steps", "1", "--out", str(tmp_path / "r"),
                 "--no-progress", *FLAGS, flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_val_loss_does_not_depend_on_grad_accum() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", **dict(TINY)))
    results = []
    for accum in (1, 2, 4):
        config = TrainConfig(out="unused", task="induction", task_size=8, model=TINY,
                             batch_size=8, grad_accum=accum, eval_batches=2)
        results.append(evaluate(model, _Source(config, model.config, None), config,
                                torch.device("cpu")))
    assert results[0] == results[1] == results[2]


@pytest.mark.slow
def test_two_processes_twice_give_the_same_run_bit_for_bit(tmp_path) -> None:
    # What docs/training.md promises for N processes: the same command gives the same run.
    import subprocess
    import sys

    from tests.train.test_train import TINY_FLAGS, losses, quiet_env

    args = ["--task", "induction", "--task-size", "8", *TINY_FLAGS, "--steps", "4",
            "--batch-size", "8", "--eval-every", "4", "--eval-batches", "1", "--log-every", "1"]
    runs = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "maskedattn", "train", "--no-progress",
                        *args, "--out", str(tmp_path / name)], check=True, env=quiet_env(),
                       capture_output=True)
        runs.append(losses(tmp_path / name))
    assert sorted(runs[0]) == [1, 2, 3, 4] and runs[0] == runs[1]
