"""One offline page with a step slider over the attention of a model at several checkpoints.

Training turns attention from uniform blur into heads with roles; this page lets a reader drag a
slider from the first checkpoint to the last and watch it happen on one text. Each step's view
is the ordinary interactive page of :func:`~maskedattn.viz.html.render_html`, embedded whole
(``training_steps.html`` beside this module shows one at a time in a frame), so every feature
of that page works at every step; the chosen layer, head and pinned token carry over when the step
changes.

Size: one attention page per step. For the demo's 2 x 4 heads over 36 tokens that is about
30 KB a step; for large models capture fewer layers, heads or rows.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .html import render_html
from .maps import AttentionMaps

__all__ = ["render_steps_html", "write_steps_html"]


def render_steps_html(steps: Sequence[tuple[int, AttentionMaps]], *,
                      title: str = "Attention during training",
                      captions: Sequence[str] | None = None, top_k: int = 32) -> str:
    """The page as a string: see :func:`write_steps_html`."""
    steps = list(steps)
    if not steps:
        raise ValueError("render_steps_html needs at least one (step, maps) pair")
    for item in steps:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int)
                and isinstance(item[1], AttentionMaps)):
            raise TypeError("steps must be (step: int, maps: AttentionMaps) pairs, got"
                            f" {type(item).__name__}")
    numbers = [s for s, _ in steps]
    if numbers != sorted(set(numbers)):
        raise ValueError(f"steps must be distinct and increasing, got {numbers}")
    if any(maps.tokens != steps[0][1].tokens for _, maps in steps):
        raise ValueError("every step's maps must be over the same tokens")
    if captions is not None and len(captions) != len(steps):
        raise ValueError(f"got {len(captions)} captions for {len(steps)} steps")
    entries = []
    for i, (step, maps) in enumerate(steps):
        caption = f"step {step}" if captions is None else captions[i]
        entries.append({"step": step, "caption": caption,
                        "page": render_html(maps, title=f"{title}: {caption}", top_k=top_k)})
    # "<" escaped: no page text can close the <script> element the JSON sits in.
    data = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = resources.files(__package__).joinpath("training_steps.html").read_text(encoding="utf-8")
    fill = {"TITLE": html.escape(title), "STEPS": data}
    return re.sub(r"\{\{(TITLE|STEPS)\}\}", lambda m: fill[m[1]], page)


def write_steps_html(steps: Sequence[tuple[int, AttentionMaps]], path: str | Path, *,
                     title: str = "Attention during training",
                     captions: Sequence[str] | None = None, top_k: int = 32) -> Path:
    """Write a page with a slider over ``steps``, ``(training step, maps)`` pairs in
    increasing step order, all maps over the same tokens. ``captions`` (one per step, default
    "step N") are shown beside the slider. Opens offline; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_steps_html(steps, title=title, captions=captions, top_k=top_k),
                    encoding="utf-8")
    return path
