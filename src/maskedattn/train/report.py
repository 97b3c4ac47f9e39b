"""The metrics log (JSON lines) and the pictures of a run: the loss curve and the heads' roles.

Pictures are written atomically (drawn into a temporary file beside the target, then renamed
over it), so a viewer that reloads ``loss.png`` while the run is writing it, or a run killed
mid-draw, never leaves half a picture.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["MetricsLog", "phase_change", "plot_heads", "plot_losses", "read_metrics"]

# A head "has" a role from this score on (viz.heads.DEFAULT_THRESHOLD: TransformerLens's usage).
ROLE_THRESHOLD = 0.4
# Role panels of heads.png, in order, with their titles.
PLOTTED_ROLES = {"induction": "induction score", "previous_token": "previous-token score"}


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        """Append one record (a dict with at least ``step``)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """All records so far."""
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot_free():
    """matplotlib's Figure and ticker, or None when matplotlib is missing (pictures skipped)."""
    try:
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError:
        return None
    return matplotlib


def _save_atomically(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    os.replace(tmp, path)


def _loss_series(records: list[dict]) -> tuple[list, list]:
    train = [(r["step"], r["loss"]) for r in records if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if _finite(r.get("val_loss"))]
    return train, val


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _log_ticks(ax, mpl, low: float, high: float) -> None:
    """A log y axis labelled with plain numbers (0.5, 1, 2, 5 ...), never "2×10⁰".

    matplotlib's default labels only powers of ten, so a curve from 4.1 to 2.3 (all within
    one decade) gets no major label at all and minor ones in scientific notation.
    """
    decades = math.log10(high / low) if high > low > 0 else 0.0
    subs = (1.0, 2.0, 5.0) if decades > 1.5 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    ax.yaxis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
    if decades < 0.3:  # a nearly flat curve: give the axis some room, and labels inside it
        middle = math.sqrt(low * high)
        ax.set_ylim(middle / 1.5, middle * 1.5)


def _draw_losses(ax, mpl, records: list[dict]) -> None:
    train, val = _loss_series(records)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    values = [v for _, v in train + val]
    if values:
        ax.set_yscale("log")
        _log_ticks(ax, mpl, min(values), max(values))
        ax.legend()
    ax.grid(alpha=0.3, which="both")


def plot_losses(records: list[dict], path: Path) -> bool:
    """Training and validation loss against step, as a PNG (written atomically).
    False if matplotlib is missing."""
    mpl = _pyplot_free()
    if mpl is None:
        return False
    fig = mpl.figure.Figure(figsize=(7, 4), dpi=100, layout="constrained")
    _draw_losses(fig.add_subplot(), mpl, records)
    _save_atomically(fig, path)
    return True


def head_series(records: list[dict], role: str) -> tuple[list[int], list[list[list[float]]]]:
    """The steps of the records holding head scores, and ``role``'s (L x H) scores at each
    (NaN for null)."""
    steps, scores = [], []
    for r in records:
        if "heads" in r and role in r["heads"]:
            steps.append(r["step"])
            scores.append([[math.nan if x is None else x for x in layer]
                           for layer in r["heads"][role]])
    return steps, scores


def phase_change(records: list[dict], role: str = "induction", *,
                 threshold: float = ROLE_THRESHOLD) -> dict | None:
    """When the first head reached ``threshold`` for ``role``, as recorded by --track-heads.

    Returns ``{"step", "before", "layer", "head", "score"}``: the first evaluation at which some
    head scored at least ``threshold``, the evaluation before it (None if it was the first), and
    that head; or None when no head got there.
    """
    steps, scores = head_series(records, role)
    for i, (step, grid) in enumerate(zip(steps, scores, strict=True)):
        best = max(((x, layer, head) for layer, row in enumerate(grid)
                    for head, x in enumerate(row) if not math.isnan(x)), default=None)
        if best is not None and best[0] >= threshold:
            return {"step": step, "before": steps[i - 1] if i else None, "layer": best[1],
                    "head": best[2], "score": best[0]}
    return None


def _draw_role(ax, records: list[dict], role: str, title: str) -> None:
    steps, scores = head_series(records, role)
    if not steps:
        return
    layers, heads = len(scores[0]), len(scores[0][0])
    for layer in range(layers):
        for head in range(heads):
            ys = [grid[layer][head] for grid in scores]
            peak = max((y for y in ys if not math.isnan(y)), default=0.0)
            if peak >= ROLE_THRESHOLD:  # a head that took the role: coloured and named
                ax.plot(steps, ys, "o-", ms=2.5, lw=1.5, label=f"layer {layer} head {head}")
            else:
                ax.plot(steps, ys, color="0.75", lw=0.8)
    ax.axhline(ROLE_THRESHOLD, color="0.4", lw=0.8, ls=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")


def plot_heads(records: list[dict], path: Path, *, title: str | None = None) -> bool:
    """Loss, then the induction and previous-token scores of every head, against step, one
    above the other on a shared step axis (PNG, atomically). A red band marks the phase change
    (:func:`phase_change`): the evaluations between which the first induction head appeared.
    False if matplotlib is missing or no head scores were recorded."""
    mpl = _pyplot_free()
    if mpl is None or not head_series(records, "induction")[0]:
        return False
    fig = mpl.figure.Figure(figsize=(8, 8.5), dpi=100, layout="constrained")
    axes = fig.subplots(1 + len(PLOTTED_ROLES), 1, sharex=True)
    _draw_losses(axes[0], mpl, records)
    for ax, (role, name) in zip(axes[1:], PLOTTED_ROLES.items(), strict=True):
        _draw_role(ax, records, role, f"{name} of each head (grey: never >= {ROLE_THRESHOLD})")
    for ax in axes[:-1]:
        ax.set_xlabel("")
    change = phase_change(records)
    if change is not None:
        start = change["before"] if change["before"] is not None else change["step"]
        for ax in axes:
            ax.axvspan(start, change["step"], color="#c0392b", alpha=0.15, lw=0)
            ax.axvline(change["step"], color="#c0392b", lw=1, ls="--")
        axes[1].annotate(f"layer {change['layer']} head {change['head']} becomes an induction"
                         f" head\n(score {change['score']:.2f} at step {change['step']})",
                         (change["step"], ROLE_THRESHOLD), textcoords="offset points",
                         xytext=(-8, 40), ha="right", fontsize=8, color="#c0392b")
    fig.suptitle(title or "how the heads formed during training", fontsize=11)
    _save_atomically(fig, path)
    return True
