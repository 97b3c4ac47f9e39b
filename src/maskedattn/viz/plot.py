"""Pictures of attention maps with matplotlib: one head with its tokens, or every head at once.

matplotlib is optional (``pip install 'maskedattn[viz]'``) and imported on first use. Figures are
built without pyplot, so nothing here touches global state or opens a window; ``save_figure``
writes PNG or SVG (or PDF), chosen by the file's suffix.

Reading the pictures: rows are queries, columns are keys, darker is more attention. Keys a
query cannot see (above the diagonal of a causal map, where the probability is exactly 0) are
grey, so the causal triangle shows as what it is: not attention of 0 but no choice at all.
Long maps are max-pooled down to at most ``max_pixels`` per side, so a line one token wide
(a previous-token head's diagonal) survives the shrinking instead of being averaged away.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._optional import require
from .maps import AttentionMaps

__all__ = ["SCALES", "plot_grid", "plot_head", "save_figure"]

SCALES = ("auto", "linear", "sqrt", "log")
MASKED_COLOR = "#d4d4d4"
GENERATED_COLOR = "#c0392b"
MARK_COLOR = "#238b45"
SAVE_FORMATS = (".png", ".svg", ".pdf")


def plot_head(maps: AttentionMaps, layer: int | None = None, head: int | None = None, *,
              scale: str = "auto", max_labels: int = 64, max_pixels: int = 1024,
              inches: float = 7.0, mark: tuple[int, str] | None = None):
    """A figure of one head's map, with token labels on both axes when there are at most
    ``max_labels`` tokens (positions otherwise).

    ``layer`` and ``head`` are the model's indices (default: the first captured). ``scale`` is
    ``"linear"``, ``"sqrt"``, ``"log"`` or ``"auto"`` (sqrt up to 128 tokens, log beyond: one
    token among a thousand gets about 0.001, invisible on a linear scale). Tokens produced by
    ``generate`` have red labels, and a dashed line marks where generation started. ``mark``
    (position, label) draws green dashed lines before that position, e.g. where a repeat
    starts. Returns a ``matplotlib.figure.Figure``.
    """
    mpl = _matplotlib()
    _check_common(maps, scale, max_pixels)
    layer = maps.layer_ids[0] if layer is None else layer
    head = maps.head_ids[0] if head is None else head
    values, hidden = (x[0] for x in _pooled(maps, maps.head(layer, head)[None], max_pixels))
    fig = mpl.figure.Figure(figsize=(inches * 1.12, inches), layout="constrained")
    ax = fig.add_subplot()
    r = len(maps.positions)
    image = _show(ax, values, hidden, _scale(scale, maps), maps.num_tokens,
                  (-0.5, maps.num_tokens - 0.5, r - 0.5, -0.5), mpl)
    if maps.generated_from is not None:
        _mark_generated(ax, maps, lambda j: j - 0.5, lambda i: i - 0.5, (-0.5, r - 0.5),
                        (-0.5, maps.num_tokens - 0.5))
    if mark is not None:
        _mark_generated(ax, maps, lambda j: j - 0.5, lambda i: i - 0.5, (-0.5, r - 0.5),
                        (-0.5, maps.num_tokens - 0.5), at=mark[0], color=MARK_COLOR)
    _label_axes(ax, maps, max_labels)
    ax.set_title(f"layer {layer}, head {head}" + (f" (green: {mark[1]})" if mark else ""))
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"attention probability ({_scale(scale, maps)})")
    return fig


def plot_grid(maps: AttentionMaps, *, scale: str = "auto", max_pixels: int = 200,
              panel_inches: float = 1.5, mark: tuple[int, str] | None = None):
    """A figure with one panel per captured head: layers down, heads across, one shared colour
    scale; ``mark`` as in :func:`plot_head`. Returns a ``matplotlib.figure.Figure``.

    The panels are tiles of one image (not one axes each), so 12 x 12 heads of 1024 tokens
    draw in seconds; ``max_pixels`` bounds each tile's side.
    """
    mpl = _matplotlib()
    _check_common(maps, scale, max_pixels)
    rows, cols = maps.num_layers, maps.num_heads
    tiles = [_pooled(maps, maps.probs[i], max_pixels) for i in range(rows)]  # a layer at a time
    values = np.block([list(v) for v, _ in tiles])
    hidden = np.block([list(h) for _, h in tiles])
    # Fixed margins in inches (labels left and top, colour bar right): no layout engine,
    # which would measure every tick of a large grid.
    left, top, right, bottom = 0.8, 0.5, 1.3, 0.2
    aspect = len(maps.positions) / maps.num_tokens  # partial maps: flatter tiles
    width = cols * panel_inches + left + right
    height = rows * panel_inches * max(aspect, 0.25) + top + bottom
    fig = mpl.figure.Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, 1 - (left + right) / width,
                       1 - (top + bottom) / height))
    cax = fig.add_axes((1 - (right - 0.3) / width, bottom / height + 0.1, 0.15 / width, 0.6))
    # Panel units: head j spans x in [j, j + 1], layer i spans y in [i, i + 1].
    image = _show(ax, values, hidden, _scale(scale, maps), maps.num_tokens,
                  (0, cols, rows, 0), mpl)
    ax.vlines(range(1, cols), 0, rows, color="white", linewidth=2)
    ax.hlines(range(1, rows), 0, cols, color="white", linewidth=2)
    if maps.generated_from is not None:
        r = len(maps.positions)
        _mark_generated(ax, maps, lambda j: np.arange(cols) + j / maps.num_tokens,
                        lambda i: np.arange(rows) + i / r, (0, rows), (0, cols))
    if mark is not None:
        r = len(maps.positions)
        _mark_generated(ax, maps, lambda j: np.arange(cols) + j / maps.num_tokens,
                        lambda i: np.arange(rows) + i / r, (0, rows), (0, cols), at=mark[0],
                        color=MARK_COLOR)
        fig.text(left / width, 0.02, f"green dashed lines: {mark[1]}", fontsize=8,
                 color=MARK_COLOR)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(cols) + 0.5, [f"head {h}" for h in maps.head_ids], fontsize=9)
    ax.set_yticks(np.arange(rows) + 0.5, [f"layer {layer}" for layer in maps.layer_ids],
                  fontsize=9)
    ax.tick_params(length=0)
    fig.colorbar(image, cax=cax, label=f"attention ({_scale(scale, maps)})")
    return fig


def save_figure(fig, path: str | Path, *, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` (``.png``, ``.svg`` or ``.pdf``, by suffix); returns the path."""
    path = Path(path)
    if path.suffix.lower() not in SAVE_FORMATS:
        raise ValueError(f"path must end in one of {SAVE_FORMATS}, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _matplotlib():
    mpl = require("matplotlib", "drawing attention maps")
    require("matplotlib.figure", "drawing attention maps")
    require("matplotlib.colors", "drawing attention maps")
    return mpl


def _check_common(maps: AttentionMaps, scale: str, max_pixels: int) -> None:
    if not isinstance(maps, AttentionMaps):
        raise TypeError(f"maps must be AttentionMaps, got {type(maps).__name__}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not isinstance(max_pixels, int) or max_pixels < 8:
        raise ValueError(f"max_pixels must be an int >= 8, got {max_pixels!r}")


def _scale(scale: str, maps: AttentionMaps) -> str:
    if scale == "auto":
        return "sqrt" if maps.num_tokens <= 128 else "log"
    return scale


def _norm(scale: str, t: int, mpl):
    colors = mpl.colors
    if scale == "linear":
        return colors.Normalize(0.0, 1.0)
    if scale == "sqrt":
        return colors.PowerNorm(0.5, 0.0, 1.0)
    # A tenth of the uniform weight 1/T is the faintest shade worth a colour.
    return colors.LogNorm(min(1e-2, max(1e-5, 0.1 / t)), 1.0)


def _pooled(maps: AttentionMaps, probs: torch.Tensor, max_pixels: int,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, R, T) max-pooled to at most ``max_pixels`` a side (a block shows its strongest
    cell), and where they are hidden: keys after the query with weight exactly 0. A block is
    hidden only when every cell in it is."""
    r, t = probs.shape[-2:]
    kernel = (math.ceil(r / max_pixels), math.ceil(t / max_pixels))
    after = torch.arange(t)[None, :] > maps.positions[:, None]  # (R, T)
    if kernel != (1, 1):
        probs = F.max_pool2d(probs, kernel, ceil_mode=True)
        after = F.max_pool2d((~after).float()[None], kernel, ceil_mode=True)[0] == 0
    probs = probs.float()
    return probs.numpy(), (after & (probs == 0)).numpy()


def _show(ax, values: np.ndarray, hidden: np.ndarray, scale: str, t: int, extent, mpl):
    """imshow with hidden cells grey, on the colour scale ``scale``."""
    norm = _norm(scale, t, mpl)
    if scale == "log":  # below the scale is white ("under"), not invalid (which would be grey)
        values = np.maximum(values, norm.vmin / 2)
    cmap = mpl.colormaps["Blues"].with_extremes(bad=MASKED_COLOR, under="white")
    return ax.imshow(np.ma.masked_array(values, hidden), cmap=cmap, norm=norm, aspect="auto",
                     interpolation="nearest", extent=extent)


def _mark_generated(ax, maps: AttentionMaps, key_x, row_y, y_span, x_span, *,
                    at: int | None = None, color: str = GENERATED_COLOR) -> None:
    """Dashed lines before the first generated key (and the first generated query row), or
    before position ``at``."""
    at = maps.generated_from if at is None else at
    style = {"color": color, "linewidth": 0.8, "linestyles": "--"}
    if 0 < at < maps.num_tokens:
        ax.vlines(key_x(at), *y_span, **style)
    first_row = int(torch.searchsorted(maps.positions, at))
    if 0 < first_row < len(maps.positions):
        ax.hlines(row_y(first_row), *x_span, **style)


def _label_axes(ax, maps: AttentionMaps, max_labels: int) -> None:
    positions = maps.positions.tolist()
    if maps.num_tokens <= max_labels:
        ax.set_xticks(range(maps.num_tokens), [display_label(t) for t in maps.tokens],
                      rotation=90, fontsize=_font_size(maps.num_tokens))
        _color_generated(ax.get_xticklabels(), range(maps.num_tokens), maps)
    if len(positions) <= max_labels:
        # Row r of a partial map is not query r: its label says which query it is.
        labels = [display_label(maps.tokens[p]) if maps.is_full and maps.num_tokens <= max_labels
                  else f"{p}: {display_label(maps.tokens[p])}" for p in positions]
        ax.set_yticks(range(len(positions)), labels, fontsize=_font_size(len(positions)))
        _color_generated(ax.get_yticklabels(), positions, maps)
    elif not maps.is_full:
        ticks = np.linspace(0, len(positions) - 1, 8).round().astype(int)
        ax.set_yticks(ticks, [str(positions[i]) for i in ticks])


def _font_size(labels: int) -> int:
    return 9 if labels <= 24 else 7 if labels <= 48 else 5


def _color_generated(labels, positions, maps: AttentionMaps) -> None:
    for label, p in zip(labels, positions, strict=True):
        if maps.is_generated(p):
            label.set_color(GENERATED_COLOR)


def display_label(token: str, width: int = 12) -> str:
    """A token as an axis label: control characters made visible, ``$`` kept literal (not
    matplotlib mathtext), long tokens cut, blank ones quoted."""
    if not token.strip():
        return repr(token)
    text = token if len(token) <= width else token[: width - 1] + "…"
    text = text.replace("\n", "↵").replace("\t", "→").replace("\r", "␍")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text.replace("$", r"\$")
