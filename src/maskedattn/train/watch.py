"""Training you can watch: plain progress lines, fuller metrics, fresh pictures, TensorBoard.

The loop hands every log record and every evaluation to a :class:`Watch`, which

- adds ``elapsed_s`` (wall time of training, carried across resumes) and ``tokens`` (tokens seen
  so far, all processes) to each record, and bits per token (``val_bits_per_token`` = val_loss /
  ln 2) and, where the corpus's bytes per token are known, bits per byte (``val_bpb``) to each
  evaluation; with ``--track-heads``, every head's role scores (:mod:`.heads_track`);
- prints one plain line per log interval and per evaluation (``progress="lines"``, what
  ``maskedattn train --no-progress`` uses), or writes the evaluation line above the progress bar;
- redraws ``loss.png`` (and ``heads.png``) after each evaluation, atomically;
- mirrors the numbers to TensorBoard (``--tensorboard``; needs the ``tensorboard`` package).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from torch import nn

from .config import TrainConfig
from .report import plot_heads, plot_losses

__all__ = ["PROGRESS", "Watch", "bytes_per_token"]

PROGRESS = ("bar", "lines", "off")
# Redrawing the pictures may take at most this share of the run's wall time: a run evaluating
# every few steps skips some redraws (the last evaluation always draws).
PLOT_SHARE = 0.1
# Tokens of the validation split decoded to measure its bytes per token.
BYTES_SAMPLE = 1 << 18
LN2 = math.log(2)


def progress_mode(progress: bool | str) -> str:
    """``True`` -> "bar", ``False`` -> "off", or one of :data:`PROGRESS` as it is."""
    if progress is True:
        return "bar"
    if progress is False or progress is None:
        return "off"
    if progress not in PROGRESS:
        raise ValueError(f"progress must be True, False or one of {PROGRESS}, got {progress!r}")
    return progress


def bytes_per_token(tokenizer, shards) -> float | None:
    """Average UTF-8 bytes per token of (the start of) a corpus split, separators counted as
    tokens of no bytes; None without a tokenizer or tokens."""
    if tokenizer is None or shards is None or len(shards) == 0:
        return None
    ids = shards.window(0, min(len(shards), BYTES_SAMPLE)).tolist()
    text = [i for i in ids if i != shards.separator]
    if hasattr(tokenizer, "decode_bytes"):  # bytes: exact, even where UTF-8 is broken
        size = len(tokenizer.decode_bytes(text))
    else:
        size = len(tokenizer.decode(text).encode("utf-8"))
    return size / len(ids) if size else None


class Watch:
    """What the loop reports, and to whom (see the module docstring).

    Made on every process; only the one with ``main`` prints, draws and writes TensorBoard.
    """

    def __init__(self, config: TrainConfig, out: Path, *, model: nn.Module, source,
                 progress: bool | str, main: bool, step: int, records: list[dict],
                 bar=None) -> None:
        self.out, self.main = out, main
        self.mode = progress_mode(progress)
        self.bar = bar
        self.total = config.steps
        self.tokens_per_step = config.batch_size * source.seq_len
        # Only the main process reports bits per byte: the others need not decode the corpus.
        self.bytes_per_token = bytes_per_token(source.tokenizer, getattr(source, "val", None)) \
            if main else None
        # A resumed run goes on counting from the time its log had reached.
        before = [r["elapsed_s"] for r in records if "elapsed_s" in r]
        self.elapsed_before = before[-1] if before else 0.0
        self.started = time.perf_counter()
        self.probe = None
        if config.track_heads:
            from .heads_track import probe_tokens

            # A task's repeats are at most task_size long: the probe's too.
            self.probe = probe_tokens(model.config.vocab_size, source.seq_len, config.seed,
                                      half=config.task_size if config.task else None)
        self.writer = None
        if config.tensorboard and main:
            self.writer = _tensorboard_writer(out / "tensorboard", purge_step=step or None)
        self._plot_cost, self._plotted_at = 0.0, -math.inf

    def elapsed(self) -> float:
        """Seconds of training so far, earlier runs of a resumed one included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def on_log(self, record: dict) -> None:
        """Complete a log record in place (tokens, elapsed) and report it."""
        record["tokens"] = record["step"] * self.tokens_per_step
        record["elapsed_s"] = round(self.elapsed(), 3)
        if self.mode == "lines":
            print(self._log_line(record), flush=True)
        self._scalars("train", record, record["step"])

    def measure(self, model: nn.Module, step: int, metrics: dict) -> dict:
        """What an evaluation adds to ``metrics``: bits, tokens, elapsed time, head scores.
        Runs on every process (the head probe runs the model)."""
        extra = {"tokens": step * self.tokens_per_step, "elapsed_s": round(self.elapsed(), 3),
                 "val_bits_per_token": metrics["val_loss"] / LN2}
        if self.bytes_per_token is not None:
            extra["val_bpb"] = extra["val_bits_per_token"] / self.bytes_per_token
        if self.probe is not None:
            from .heads_track import track_heads

            extra["heads"] = track_heads(model, self.probe)
        return extra

    def on_eval(self, step: int, metrics: dict, records: list[dict]) -> None:
        """Report an evaluation: a line, fresh pictures, TensorBoard."""
        line = self._eval_line(step, metrics)
        if self.bar is not None:
            self.bar.write(line)
        elif self.mode == "lines":
            print(line, flush=True)
        self._scalars("eval", metrics, step)
        if "heads" in metrics and self.writer is not None:
            for role, grid in metrics["heads"].items():
                for layer, row in enumerate(grid):
                    for head, x in enumerate(row):
                        if x is not None:
                            self.writer.add_scalar(f"heads/{role}/L{layer}H{head}", x, step)
        # Redraw unless the last drawing was so recent that drawing now would take more than
        # PLOT_SHARE of the time since.
        now = time.perf_counter()
        if step == self.total or now - self._plotted_at >= self._plot_cost / PLOT_SHARE:
            self.draw(records)

    def draw(self, records: list[dict]) -> None:
        """Write loss.png (and heads.png when heads are tracked) from ``records``."""
        t0 = time.perf_counter()
        plot_losses(records, self.out / "loss.png")
        if self.probe is not None:
            plot_heads(records, self.out / "heads.png")
        self._plotted_at = time.perf_counter()
        self._plot_cost = self._plotted_at - t0

    def close(self, records: list[dict]) -> None:
        """The final pictures (when the last evaluation did not draw them) and TensorBoard's
        last flush."""
        if self.main and records and self._plotted_at == -math.inf:
            self.draw(records)
        if self.writer is not None:
            self.writer.close()

    def _scalars(self, group: str, record: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{group}/{key}", value, step)

    def _log_line(self, r: dict) -> str:
        width = len(str(self.total))
        return (f"step {r['step']:>{width}}/{self.total}  loss {r['loss']:.4f}"
                f"  lr {r['lr']:.2e}  grad {r['grad_norm']:.3f}"
                f"  {_si(r['tokens_per_s'])} tok/s  {_si(r['tokens'])} tokens"
                f"  {_clock(r['elapsed_s'])}")

    def _eval_line(self, step: int, m: dict) -> str:
        width = len(str(self.total))
        parts = [f"step {step:>{width}}/{self.total}  eval  val_loss {m['val_loss']:.4f}",
                 f"ppl {m['val_ppl']:.2f}"]
        if "accuracy" in m:
            parts.append(f"accuracy {m['accuracy']:.1%}")
        if "val_bpb" in m:
            parts.append(f"{m['val_bpb']:.3f} bits/byte")
        else:
            parts.append(f"{m['val_bits_per_token']:.3f} bits/token")
        if "heads" in m:
            parts.append(_best_heads(m["heads"]))
        return "  ".join(parts)


def _best_heads(heads: dict) -> str:
    """The best induction and previous-token head, e.g. "induction L1H3 0.82"."""
    shown = []
    for role, name in (("induction", "induction"), ("previous_token", "prev-token")):
        cells = [(x, layer, head) for layer, row in enumerate(heads.get(role, []))
                 for head, x in enumerate(row) if x is not None]
        if cells:
            x, layer, head = max(cells)
            shown.append(f"{name} L{layer}H{head} {x:.2f}")
    return "  ".join(shown)


def _si(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _tensorboard_writer(log_dir: Path, purge_step: int | None):
    from .._optional import require

    require("tensorboard", "--tensorboard (TensorBoard logs)")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

