"""One self-contained HTML page to explore attention maps in a browser, offline.

The page (``page.html`` beside this module, vanilla JavaScript, no build step) loads nothing from
the network: the maps, the tokens and the head scores are inlined. Pick a layer and a head (or
click a head in the overview grid, coloured by a role score); hover a token to see which tokens
it attends to and with what weight; a heatmap shows the whole head. Tokens produced by
``generate`` are drawn apart from the prompt.

Storage: a full float32 capture of 12 layers x 12 heads x 1024 x 1024 is 600 MB, too much for a
page. Each query row keeps its ``top_k`` largest weights (key index as uint16, weight as one
byte on a log scale from ``FLOOR`` to 1, so within 1.9% of the true value), plus one byte for
the weight of everything else in the row ("rest"), which the heatmap spreads evenly over the
row's other visible keys. That is about 3 bytes per kept weight, deflated, then base64: a
1024-token 12 x 12 view is 3 to 11 MB and loads in well under two seconds.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .attribution import PageExtras
from .heads import DEFAULT_THRESHOLD, ROLES, HeadScores, head_scores
from .maps import AttentionMaps, index_of

__all__ = ["FLOOR", "EncodedMaps", "InlinePage", "decode_maps", "encode_maps", "most_telling_head",
           "render_html", "show", "write_html"]

# Weights below FLOOR are dropped; 254 log steps span [FLOOR, 1]: each step is a factor of
# FLOOR ** (-1/254) = 1.037, so rounding errs by at most half a step, 1.83%.
FLOOR = 1e-4
_STEPS = 254
MAX_TOP_K = 255  # per-row counts are stored in one byte
MAX_TOKENS = 65536  # key indices are stored as uint16


@dataclass(frozen=True)
class EncodedMaps:
    """Maps in the page's compact form: the JSON header and the binary payload (before deflate).

    Payload layout, little-endian, for N kept weights and L*H*R rows in (layer, head, row)
    order: ``cols`` uint16[N], ``codes`` uint8[N], ``counts`` uint8[L*H*R],
    ``rest`` uint8[L*H*R]. Row n's weights are ``cols/codes[sum(counts[:n]) ...]``, largest
    first.
    """

    header: dict
    payload: bytes


def quantize(p: torch.Tensor) -> torch.Tensor:
    """uint8 codes of probabilities: ``1 + round(254 * log(p / FLOOR) / log(1 / FLOOR))``,
    and 0 (dropped) for weights more than half a step below FLOOR."""
    steps = (p.float() / FLOOR).log() * (_STEPS / math.log(1 / FLOOR))
    return (steps.round() + 1).clamp(0, _STEPS + 1).to(torch.uint8)  # log(0) = -inf -> 0


def dequantize(codes: torch.Tensor) -> torch.Tensor:
    """float64 probabilities of uint8 codes (0 -> 0)."""
    c = codes.double()
    return torch.where(c > 0, FLOOR ** (1 - (c - 1) / _STEPS), 0.0)


def encode_maps(maps: AttentionMaps, *, top_k: int = 32) -> EncodedMaps:
    """Keep each row's ``top_k`` largest weights, quantised; see :class:`EncodedMaps`."""
    if not isinstance(maps, AttentionMaps):
        raise TypeError(f"maps must be AttentionMaps, got {type(maps).__name__}")
    if not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be an int in [1, {MAX_TOP_K}], got {top_k!r}")
    if maps.num_tokens > MAX_TOKENS:
        raise ValueError(f"the page holds at most {MAX_TOKENS} tokens, got {maps.num_tokens}")
    k = min(top_k, maps.num_tokens)
    cols, codes, counts, rests = [], [], [], []
    for layer in range(maps.num_layers):  # one layer at a time: bounded temporary memory
        probs = maps.probs[layer].float()  # (H, R, T)
        top, index = probs.topk(k, dim=-1)  # largest first
        code = quantize(top)
        kept = code > 0  # a prefix of each row, since weights are sorted
        cols.append(index[kept].to(torch.int32))
        codes.append(code[kept])
        counts.append(kept.sum(-1).flatten().to(torch.uint8))
        rest = probs.sum(-1).double() - torch.where(kept, top, 0).double().sum(-1)
        rests.append(quantize(rest.clamp(min=0)).flatten())
    payload = b"".join([
        torch.cat(cols).numpy().astype("<u2").tobytes(),
        torch.cat(codes).numpy().tobytes(),
        torch.cat(counts).numpy().tobytes(),
        torch.cat(rests).numpy().tobytes(),
    ])
    header = {
        "version": 1,
        "tokens": maps.tokens,
        "rows": None if maps.rows is None else maps.rows.tolist(),
        "layers": maps.layer_ids,
        "heads": maps.head_ids,
        "generated_from": maps.generated_from,
        "top_k": k,
        "floor": FLOOR,
        "steps": _STEPS,
        "entries": int(sum(len(c) for c in cols)),
    }
    return EncodedMaps(header, payload)


def decode_maps(encoded: EncodedMaps) -> torch.Tensor:
    """(L, H, R, T) float64 maps back from :func:`encode_maps`: the kept weights, and each row's
    rest spread evenly over its other visible keys (the page's JavaScript does the same)."""
    h = encoded.header
    t, n = len(h["tokens"]), h["entries"]
    shape = (len(h["layers"]), len(h["heads"]), t if h["rows"] is None else len(h["rows"]), t)
    rows = math.prod(shape[:3])
    buf = np.frombuffer(encoded.payload, dtype=np.uint8)
    cols = torch.from_numpy(buf[: 2 * n].view("<u2").astype(np.int64))
    codes = torch.from_numpy(buf[2 * n: 3 * n].copy())
    counts = torch.from_numpy(buf[3 * n: 3 * n + rows].astype(np.int64))
    rest = dequantize(torch.from_numpy(buf[3 * n + rows:].copy()))
    positions = torch.arange(t) if h["rows"] is None else torch.tensor(h["rows"])
    visible = (torch.arange(t)[None, :] <= positions[:, None]).expand(shape).reshape(rows, t)
    out = torch.zeros(rows, t, dtype=torch.float64)
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    out[row_of, cols] = dequantize(codes)
    others = visible & (out == 0)
    out += others * (rest / others.sum(-1).clamp(min=1))[:, None]
    return out.reshape(shape)


def most_telling_head(scores: HeadScores, layer: int | None = None) -> tuple[int, int]:
    """(layer, head) of the head with the highest score of the most specific role that some head
    reaches the threshold for (induction first, local last); the strongest head overall when
    none does. ``layer`` restricts the choice to one layer."""
    best_any = None
    for role in ROLES:
        ranked = [x for x in scores.ranked(role) if layer is None or x[0] == layer]
        if ranked and ranked[0][2] >= DEFAULT_THRESHOLD:
            return ranked[0][0], ranked[0][1]
        if ranked and (best_any is None or ranked[0][2] > best_any[2]):
            best_any = ranked[0]
    if best_any is None:
        return (layer or 0), 0
    return best_any[0], best_any[1]


def _extras_header(extras: PageExtras | None, maps: AttentionMaps) -> dict:
    """The page's q·k and direct-effect data, for the captured layers and heads."""
    if extras is None:
        return {}
    li = [index_of(layer, extras.layers, "layer") for layer in maps.layer_ids]
    hi = maps.head_ids
    t = maps.num_tokens
    out = {"effects": [[[round(v, 4) for v in row[:t]] for row in layer]
                       for layer in extras.effects[li][:, hi].tolist()],
           "predicted": extras.predicted[:t]}
    if extras.q is not None:
        def b64(x: torch.Tensor) -> str:
            x = x[li][:, hi, :t].contiguous().numpy().astype("<f4")
            return base64.b64encode(x.tobytes()).decode("ascii")

        out["qk"] = {"q": b64(extras.q), "k": b64(extras.k), "dim": extras.q.shape[-1],
                     "scale": extras.scale}
    return out


def render_html(maps: AttentionMaps, *, title: str = "Attention maps", top_k: int = 32,
                threshold: float = DEFAULT_THRESHOLD, extras: PageExtras | None = None,
                mark: tuple[int, str] | None = None) -> str:
    """The page as a string: see :func:`write_html`."""
    encoded = encode_maps(maps, top_k=top_k)
    scores = head_scores(maps)
    if mark is not None and not (isinstance(mark[0], int) and 0 < mark[0] < maps.num_tokens):
        raise ValueError(f"mark must be (position, label) with 0 < position < {maps.num_tokens},"
                         f" got {mark!r}")
    best = most_telling_head(scores)
    header = {**encoded.header, "title": title, "threshold": threshold, "roles": list(ROLES),
              "scores": scores.to_dict(),
              "initial": [maps.layer_ids.index(best[0]), maps.head_ids.index(best[1])],
              "mark": None if mark is None else {"at": mark[0], "label": mark[1]},
              **_extras_header(extras, maps)}
    # Level 1: the payload is mostly quantised codes and key indices, which deflate about as
    # well at level 1 as at 6 (9.9 vs 9.8 MB for 1024 tokens x 144 heads) in a third of the time.
    data = base64.b64encode(zlib.compress(encoded.payload, 1)).decode("ascii")
    # "<" escaped so no token text can close the <script> element it sits in.
    meta = json.dumps(header, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    fill = {"TITLE": html.escape(title), "META": meta, "DATA": data}
    # One pass, so a token that reads "{{DATA}}" stays text.
    return re.sub(r"\{\{(TITLE|META|DATA)\}\}", lambda m: fill[m[1]], page)


def write_html(maps: AttentionMaps, path: str | Path, *, title: str = "Attention maps",
               top_k: int = 32, threshold: float = DEFAULT_THRESHOLD,
               extras: PageExtras | None = None, mark: tuple[int, str] | None = None) -> Path:
    """Write the interactive page for ``maps`` to ``path`` (one file, opens offline).

    ``top_k`` weights are kept per query row (at most 255); ``threshold`` is the score from which
    the head overview names a head's role. ``extras`` (:func:`~.attribution.page_extras`) adds
    the q·k view of a (query, key) pair and each head's direct effect on the prediction;
    ``mark`` (position, label) draws a line before that position (e.g. where a repeat starts).
    The page opens on the most telling head (:func:`most_telling_head`). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(maps, title=title, top_k=top_k, threshold=threshold,
                                extras=extras, mark=mark), encoding="utf-8")
    return path


class InlinePage:
    """A page for a notebook: Jupyter calls ``_repr_html_`` and shows it inline, no server.

    The page runs in a sandboxed ``<iframe srcdoc=...>``, so its script and styles cannot clash
    with the notebook's.
    """

    def __init__(self, page: str, height: int = 760) -> None:
        self.page, self.height = page, height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.page, quote=True)}" style="width: 100%;'
                f' height: {self.height}px; border: 1px solid #d0d7de"'
                ' sandbox="allow-scripts"></iframe>')

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` as a standalone file; returns the path."""
        path = Path(path)
        path.write_text(self.page, encoding="utf-8")
        return path


def show(maps: AttentionMaps, *, height: int = 760, **options) -> InlinePage:
    """The page of ``maps`` for inline display in Jupyter (the cell's last expression, or
    ``IPython.display.display(show(maps))``); ``options`` as for :func:`write_html`."""
    return InlinePage(render_html(maps, **options), height)
