"""``maskedattn viz --run DIR``: the same text through every kept checkpoint of a run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model import GPT
from ..train import checkpoint as ckpt
from ..viz.capture import capture_attention
from ..viz.maps import AttentionMaps
from ..viz.training_steps import write_steps_html

__all__ = ["run_checkpoints", "step_caption", "write_run_steps"]


def run_checkpoints(run: str | Path) -> list[Path]:
    """The complete checkpoints of a training run's directory, oldest first."""
    found = ckpt.list_checkpoints(Path(run))
    if not found:
        raise ValueError(f"{run} holds no checkpoint (step-NNNNNN/ with {ckpt.TRAINER_STATE});"
                         " give the --out directory of `maskedattn train`")
    return found


def step_caption(checkpoint: Path) -> tuple[int, str]:
    """The checkpoint's step, and a caption with its evaluation: "step 300 · val_loss 2.61"."""
    state = json.loads((checkpoint / ckpt.TRAINER_STATE).read_text())
    step = int(state["step"])
    evals = [m for m in state.get("last_metrics", []) if "val_loss" in m and m["step"] == step]
    caption = f"step {step}"
    if evals:
        caption += f" · val_loss {evals[-1]['val_loss']:.3f}"
        if "accuracy" in evals[-1]:
            caption += f" · accuracy {evals[-1]['accuracy']:.0%}"
    return step, caption


@torch.no_grad()
def write_run_steps(checkpoints: list[Path], newest: AttentionMaps, path: Path, *,
                    device: torch.device, title: str) -> Path:
    """Capture what ``newest`` (the maps of the last checkpoint) captured, at every earlier
    checkpoint, on the same tokens; write the slider page to ``path``."""
    if newest.token_ids is None:
        raise ValueError("the maps need token_ids to run the other checkpoints on them")
    tokens = torch.tensor([newest.token_ids], device=device)
    steps, captions = [], []
    for i, directory in enumerate(checkpoints):
        step, caption = step_caption(directory)
        if i == len(checkpoints) - 1:
            maps = newest
        else:
            model = GPT.from_pretrained(directory, device=device).eval()
            rows = None if newest.rows is None else newest.rows.tolist()
            with capture_attention(model, layers=newest.layer_ids, heads=newest.heads,
                                   rows=rows) as cap:
                model(tokens)
            maps = cap.maps(newest.tokens, token_ids=newest.token_ids,
                            generated_from=newest.generated_from)
        steps.append((step, maps))
        captions.append(caption)
    return write_steps_html(steps, path, title=title, captions=captions)
