"""The demo's section on how its heads formed: the phase change, pictured and told."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ..model import GPT

__all__ = ["Formation", "describe_formation"]


class Formation:
    """How the heads formed: the model at every evaluation of the demo's run, then the maps of
    the example at each (a step slider, formation.html) and the role scores that --track-heads
    recorded against the loss (formation.png), with the phase change of Olsson et al. (2022):
    the induction head appears as the loss drops."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.models: list[tuple[int, GPT, dict]] = []

    def on_eval(self, step: int, metrics: dict) -> None:
        """``train``'s callback: keep the checkpoint just written (tiny: kept in memory)."""
        from ..train.checkpoint import list_checkpoints

        self.models.append((step, GPT.from_pretrained(list_checkpoints(self.run_dir)[-1]),
                            metrics))

    def write(self, out: Path, example: torch.Tensor, labels: list[str]) -> None:
        """Write formation.png and formation.html into ``out``; say what they show."""
        from ..train.report import plot_heads, read_metrics
        from ..viz.capture import capture_attention
        from ..viz.training_steps import write_steps_html

        records = read_metrics(self.run_dir / "metrics.jsonl")
        plot_heads(records, out / "formation.png",
                   title="induction heads appear as the loss drops (Olsson et al. 2022)")
        steps, captions = [], []
        for step, model, metrics in self.models:
            model.eval()
            with torch.no_grad(), capture_attention(model) as cap:
                model(example)
            steps.append((step, cap.maps(labels, token_ids=example[0].tolist())))
            captions.append(f"step {step} · loss {metrics['val_loss']:.2f} · repeat predicted"
                            f" {metrics['accuracy']:.0%}")
        write_steps_html(steps, out / "formation.html", captions=captions,
                         title="maskedattn demo: attention during training")
        print()
        print("How the heads formed (formation.png; formation.html: drag the slider):")
        print("  " + describe_formation(records))


def describe_formation(records: list[dict]) -> str:
    """One sentence on the phase change in a run's records (see :class:`Formation`)."""
    from ..train.report import phase_change

    evals = {r["step"]: r for r in records if "val_loss" in r}
    change = phase_change(records)
    if change is None:
        best = max((x for r in evals.values() for row in r.get("heads", {}).get("induction", [])
                    for x in row if x is not None), default=0.0)
        return (f"no induction head yet (best score {best:.2f}); train longer (--steps) to see"
                " one appear")
    at = evals[change["step"]]
    text = (f"layer {change['layer']} head {change['head']} became an induction head at step"
            f" {change['step']} (score {change['score']:.2f})")
    if change["before"] is not None:
        was = evals[change["before"]]
        text += (f"; since step {change['before']} the loss fell {was['val_loss']:.2f} ->"
                 f" {at['val_loss']:.2f} and the repeat predicted rose {was['accuracy']:.0%} ->"
                 f" {at['accuracy']:.0%}")
    steps = sorted(evals)
    drops = [(evals[a]["val_loss"] - evals[b]["val_loss"], a, b)
             for a, b in itertools.pairwise(steps)]
    if drops:
        _, a, b = max(drops)
        text += f"; the loss fell fastest between steps {a} and {b}"
    return text + "."
