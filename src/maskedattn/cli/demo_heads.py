"""The demo's second half: what its heads cause (ablation), and the five steps of one of them.

Kept apart from :mod:`.demo`, which trains and draws; this module only reads the trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.tasks import IGNORE, Induction, TaskBatch


def repeat_start(batch: TaskBatch) -> int:
    """Position where the repeated copy of row 0 begins: its first scored target."""
    scored = (batch.targets[0] != IGNORE).nonzero()
    return int(scored[0]) if scored.numel() else 0


def control_head(scores, induction: list[tuple[int, int, float]]) -> tuple[int, int]:
    """A head to ablate for comparison: in the induction heads' layer, the one with the lowest
    induction score (the last layer when no induction head was found)."""
    layer = induction[0][0] if induction else scores.layers[-1]
    named = {(lay, h) for lay, h, _ in induction}
    others = [(s, h) for h in scores.heads if (layer, h) not in named
              for s in [scores.score("induction", layer, h)]]
    return layer, min(others)[1] if others else scores.heads[-1]


def ablation_report(model, task: Induction, induction: list[tuple[int, int, float]], scores,
                    seed: int) -> dict:
    """Accuracy on the repeat with the induction heads ablated together, and with one other
    head ablated, on 256 fresh sequences: the causal evidence that those heads do the work."""
    from ..viz.ablate import ablation_table

    batch = task.sample(256, torch.Generator().manual_seed(seed + 13))
    heads = [(layer, h) for layer, h, _ in induction]
    control = control_head(scores, induction)
    groups = [heads] if heads else []
    rows = ablation_table(model, batch.tokens, batch.targets, heads=[control], groups=groups)
    report = {"intact": rows[0].accuracy, "control_head": list(control),
              "control_ablated": rows[1].accuracy, "chance": 1 / task.vocab_size,
              "induction_heads": [list(p) for p in heads],
              "induction_ablated": rows[2].accuracy if heads else None}
    return report


def print_ablation(report: dict) -> None:
    """The report in words."""
    lines = [("intact model", report["intact"], "")]
    if report["induction_ablated"] is not None:
        names = ", ".join(f"L{lay}H{h}" for lay, h in report["induction_heads"])
        lines.append((f"induction heads {names} off", report["induction_ablated"],
                      f" (chance: {report['chance']:.0%})"))
    lay, h = report["control_head"]
    lines.append((f"another head, L{lay}H{h}, off", report["control_ablated"], ""))
    width = max(len(name) for name, _, _ in lines) + 1
    print()
    print("What the heads cause: each switched off (output set to zero) on 256 fresh sequences:")
    for name, acc, note in lines:
        print(f"  {name + ':':<{width}} {acc:4.0%} of the repeat predicted{note}")


def write_understanding(model, task: Induction, example: TaskBatch, labels: list[str],
                        scores, induction: list[tuple[int, int, float]], out: Path,
                        seed: int) -> list[str]:
    """Ablation report (printed, and ablation.json) and the induction head's steps page
    (steps.html, worked on the first token of the repeat whose earlier copy it can find).
    Returns the names of the files written."""
    from ..viz.steps import layer_steps
    from ..viz.steps_html import write_steps_html

    report = ablation_report(model, task, induction, scores, seed)
    print_ablation(report)
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    layer, head = (induction[0][0], induction[0][1]) if induction else (scores.layers[-1], 0)
    start = repeat_start(example)
    token = min(start + 2, len(labels) - 1)  # a query with an earlier copy, two steps in
    steps = layer_steps(model, example.tokens[0], layer)
    write_steps_html(steps, labels, out / "steps.html", head=head, token=token,
                     title=f"maskedattn demo: the five steps of layer {layer}, head {head}")
    return ["ablation.json", "steps.html"]
