"""The five steps of one layer as an offline page: pick a token and follow its row of attention.

The page (``steps_page.html`` beside this module, vanilla JavaScript, nothing from the network)
shows, for the chosen head and query token: its query vector (before and after positions), every
key with the dot product, the scaling, the mask and the softmax weight as a bar, each value
vector weighted by it, their sum, and the layer's output after Wo. Every number is the one
:func:`~maskedattn.viz.steps.layer_steps` computed (float64, written with 5 significant digits);
hovering shows it. Clicking a key opens the q·k view: the products q[d]·k[d], so one sees which
dimensions make the score large.
"""

from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from pathlib import Path

from torch import Tensor

from .steps import LayerSteps

__all__ = ["MAX_STEPS_TOKENS", "render_steps_html", "show_steps", "steps_page_data",
           "write_steps_html"]

# The page holds every head's T x T scores and probabilities as text: 256 tokens of 12 heads is
# about 1.5 million numbers, 10 MB. Beyond that, choose a shorter text.
MAX_STEPS_TOKENS = 256


def _r(t: Tensor):
    """Nested lists with 5 significant digits; -inf as None (JSON has no infinity)."""
    def clean(v: float):
        return None if v == -math.inf else float(f"{v:.5g}")

    def walk(x):
        return [walk(v) for v in x] if isinstance(x, list) else clean(x)

    return walk(t.detach().double().tolist())


def steps_page_data(steps: LayerSteps, tokens: list[str], *, head: int = 0,
                    token: int | None = None, title: str = "The five steps") -> dict:
    """What the page shows, JSON-ready (see the module docstring)."""
    t = len(tokens)
    if t != steps.x.shape[0]:
        raise ValueError(f"tokens must have one label per position ({steps.x.shape[0]}), got {t}")
    if t > MAX_STEPS_TOKENS:
        raise ValueError(f"the steps page holds at most {MAX_STEPS_TOKENS} tokens, got {t}:"
                         " explain a shorter text")
    w, tr = steps.weights, steps.trace
    if not 0 <= head < w.n_heads:
        raise ValueError(f"head {head} is out of range: the layer has {w.n_heads} heads")
    token = t - 1 if token is None else token
    if not 0 <= token < t:
        raise ValueError(f"token {token} is out of range: the text has {t} tokens")
    visible = tr.visible[0]
    return {
        "title": title, "tokens": list(tokens), "layer": steps.layer, "heads": w.n_heads,
        "kv_heads": w.n_kv_heads, "head_dim": w.head_dim, "width": steps.x.shape[1],
        "scale": steps.scale, "positions": steps.positions_kind, "head": head, "token": token,
        "has_bias": w.bq is not None, "x": _r(steps.x), "q_raw": _r(steps.q_raw),
        "q": _r(steps.q), "k": _r(steps.k), "v": _r(steps.v), "scores": _r(tr.scores[0]),
        "probs": _r(tr.probs[0]), "output": _r(tr.output[0]), "projected": _r(steps.projected),
        # One mask for every head unless the trace has a mask per head.
        "visible": [[int(b) for b in row] for row in
                    (visible[0] if visible.shape[0] == 1 else visible[head]).tolist()],
    }


def render_steps_html(steps: LayerSteps, tokens: list[str], *, head: int = 0,
                      token: int | None = None, title: str = "The five steps") -> str:
    """The page as a string: see :func:`write_steps_html`."""
    data = steps_page_data(steps, tokens, head=head, token=token, title=title)
    # "<" escaped so no token text can close the <script> element it sits in.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = resources.files(__package__).joinpath("steps_page.html").read_text(encoding="utf-8")
    fill = {"TITLE": html.escape(title), "DATA": payload}
    return re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: fill[m[1]], page)


def write_steps_html(steps: LayerSteps, tokens: list[str], path: str | Path, *, head: int = 0,
                     token: int | None = None, title: str = "The five steps") -> Path:
    """Write the steps page of ``steps`` (one file, opens offline) to ``path``; returns it.

    ``head`` and ``token`` are what the page opens on (default: head 0, the last token).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_steps_html(steps, tokens, head=head, token=token, title=title),
                    encoding="utf-8")
    return path


def show_steps(steps: LayerSteps, tokens: list[str], *, head: int = 0, token: int | None = None,
               title: str = "The five steps", height: int = 900):
    """The steps page for inline display in Jupyter (an :class:`~.html.InlinePage`)."""
    from .html import InlinePage

    return InlinePage(render_steps_html(steps, tokens, head=head, token=token, title=title),
                      height)
