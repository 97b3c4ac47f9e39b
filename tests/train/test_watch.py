"""Training you can watch: plain lines with --no-progress, fuller metrics, loss.png at each
evaluation (atomically, readable ticks), TensorBoard logs, bits per byte on a byte corpus."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from maskedattn.cli.main import main
from maskedattn.data.prepare import prepare
from maskedattn.train import report
from maskedattn.train.config import TrainConfig
from maskedattn.train.loop import train
from maskedattn.train.watch import Watch, bytes_per_token, progress_mode

TINY = (("context", 16), ("n_embd", 16), ("n_head", 2), ("n_layer", 1), ("vocab_size", 32))
FLAGS = ["--task", "induction", "--task-size", "4", "--context", "16", "--n-embd", "16",
         "--n-head", "2", "--n-layer", "1", "--vocab-size", "32", "--batch-size", "4",
         "--eval-batches", "1", "--warmup", "2"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_no_progress_prints_a_line_per_log_interval_and_evaluation(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *FLAGS, "--steps", "6", "--log-every", "2", "--eval-every", "3",
                 "--no-progress", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    logs = re.findall(r"^step (\d)/6  loss \d+\.\d{4}  lr .* tok/s  .* tokens  \d:\d\d:\d\d$",
                      out, re.M)
    evals = re.findall(r"^step (\d)/6  eval  val_loss \d+\.\d{4}  ppl .*  accuracy .*%  "
                       r"\d\.\d{3} bits/token$", out, re.M)
    assert logs == ["2", "4", "6"] and evals == ["3", "6"], out
    recs = records(run)
    for r in recs:
        assert r["tokens"] == r["step"] * 4 * 9  # batch 4 x seq_len 2 * 4 + 4 // 4
        assert r["elapsed_s"] >= 0
    elapsed = [r["elapsed_s"] for r in recs]
    assert elapsed == sorted(elapsed)
    ev = [r for r in recs if "val_loss" in r]
    assert all(math.isclose(r["val_bits_per_token"], r["val_loss"] / math.log(2)) for r in ev)
    assert "val_bpb" not in ev[0]  # a task has no bytes


def test_loss_png_is_redrawn_at_each_evaluation_atomically(tmp_path) -> None:
    seen = []

    def on_eval(step, metrics):  # runs after the loop's redraw of that evaluation
        png = tmp_path / "loss.png"
        seen.append((step, png.stat().st_mtime_ns if png.exists() else None))
        assert not list(tmp_path.glob(".loss.png.tmp*"))  # no temporary file left behind

    config = TrainConfig(out=str(tmp_path), task="induction", task_size=4, model=TINY, steps=4,
                         batch_size=4, eval_every=2, eval_batches=1, warmup=1, log_every=1)
    import maskedattn.train.watch as watch

    old = watch.PLOT_SHARE
    watch.PLOT_SHARE = math.inf  # redraw at every evaluation, however fast they come
    try:
        train(config, progress=False, on_eval=on_eval)
    finally:
        watch.PLOT_SHARE = old
    assert [s for s, _ in seen] == [2, 4]
    assert all(m is not None for _, m in seen) and seen[0][1] <= seen[1][1]


def test_log_ticks_are_plain_numbers(tmp_path) -> None:
    import matplotlib.figure

    for low, high in ((2.3, 4.1), (0.05, 4.2), (3.01, 3.02)):
        recs = [{"step": s, "loss": high - (high - low) * s / 10} for s in range(1, 11)]
        fig = matplotlib.figure.Figure()
        ax = fig.add_subplot()
        report._draw_losses(ax, matplotlib, recs)
        fig.canvas.draw()
        bottom, top = ax.get_ylim()
        labels = [t.get_text() for t in ax.get_yticklabels()
                  if t.get_text() and bottom <= t.get_position()[1] <= top]
        assert len(labels) >= 2, (low, high, labels)
        for text in labels:
            float(text)  # "2", "0.5", "3": no 10^x notation
    assert report.plot_losses(recs, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_bits_per_byte_on_a_byte_corpus(tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 2000)  # 22 blocks
    prepare([str(text)], tmp_path / "corpus")
    config = TrainConfig(out=str(tmp_path / "run"), data=str(tmp_path / "corpus"),
                         model=(("context", 16), ("n_embd", 16), ("n_head", 2), ("n_layer", 1)),
                         steps=2, batch_size=2, eval_every=2, eval_batches=1, warmup=1)
    result = train(config, progress=False)
    ev = [r for r in result.metrics if "val_loss" in r][-1]
    # Bytes: one byte per token but the separators (one per document): bpb ~ bits/token.
    assert ev["val_bpb"] == pytest.approx(ev["val_bits_per_token"], rel=0.01)
    assert ev["val_bpb"] >= ev["val_bits_per_token"]


def test_bytes_per_token_of_a_multibyte_tokenizer() -> None:
    class Chars:  # two UTF-8 bytes per token ("é")
        def decode(self, ids):
            return "é" * len(ids)

    class Shards:
        separator = 9

        def __len__(self):
            return 10

        def window(self, start, length):
            return torch.tensor([1, 2, 3, 9] * 2 + [1, 2])[start:start + length]

    assert bytes_per_token(Chars(), Shards()) == pytest.approx(2 * 8 / 10)
    assert bytes_per_token(None, Shards()) is None


def test_tensorboard_logs(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(out=str(tmp_path), task="induction", task_size=4, model=TINY, steps=4,
                         batch_size=4, eval_every=2, eval_batches=1, warmup=1, log_every=1,
                         tensorboard=True, track_heads=True)
    train(config, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/elapsed_s", "eval/val_loss", "eval/accuracy",
            "eval/val_bits_per_token", "heads/induction/L0H1"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    assert main(["train", *FLAGS, "--steps", "1", "--tensorboard", "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "tensorboard" in err and "pip install" in err and "Traceback" not in err


def test_progress_modes() -> None:
    assert progress_mode(True) == "bar" and progress_mode(False) == "off"
    assert progress_mode("lines") == "lines"
    with pytest.raises(ValueError, match="progress"):
        progress_mode("loud")
    assert Watch is not None


def test_elapsed_time_goes_on_after_a_resume(tmp_path) -> None:
    from types import SimpleNamespace

    config = TrainConfig(out=str(tmp_path), task="induction", task_size=4, model=TINY, steps=4)
    source = SimpleNamespace(seq_len=9, tokenizer=None)
    earlier = [{"step": 2, "loss": 3.0, "elapsed_s": 100.0}, {"step": 2, "val_loss": 3.0}]
    watch = Watch(config, tmp_path, model=None, source=source, progress="off", main=True,
                  step=2, records=earlier)
    record = {"step": 3, "loss": 2.9, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}
    watch.on_log(record)
    assert 100.0 <= record["elapsed_s"] < 110.0 and record["tokens"] == 3 * 16 * 9
