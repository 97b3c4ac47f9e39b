"""``maskedattn explain "some text"``: the five steps of masked self-attention, printed.

The text's tokens get seeded random vectors and the projections seeded random weights: nothing is
trained, so the numbers mean nothing in themselves; what the command shows is *how* each step
transforms the previous one, and what the mask does.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import textwrap
import zlib

import torch
from torch import Tensor

from ..attention.masks import Causal, Mask, PrefixLM, SlidingWindow
from ..attention.reference import StepsTrace, attention_steps
from ._device import add_device_argument, resolve_device

LABEL_WIDTH = 8
CELL_WIDTH = 7


def add_parser(subparsers) -> None:
    """Register ``explain``."""
    p = subparsers.add_parser(
        "explain",
        help="print every step of masked self-attention on a text",
        description="Run the five steps of masked self-attention (projections, scores and "
        "scaling, mask, softmax, weighted sum of values) on the tokens of TEXT with small "
        "seeded random weights, and print each step's matrix with the tokens on rows "
        "(queries) and columns (keys).",
        epilog='Example: maskedattn explain "the cat sat on the mat" --mask window:2',
    )
    p.add_argument("text", help="the text to tokenise (quote it)")
    p.add_argument("--tokens", choices=["words", "bytes"], default="words",
                   help="split the text into words (default) or UTF-8 bytes")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    p.add_argument("--dim", type=int, default=16,
                   help="model width C; each head gets C/heads dimensions (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--mask", default="causal", type=parse_mask_arg, metavar="MASK",
                   help="causal (default), none (vanilla bidirectional self-attention), "
                   "window:W (causal, last W tokens) or prefix:N (bidirectional inside the "
                   "first N tokens)")
    p.add_argument("--json", action="store_true", help="print the whole trace as JSON")
    add_device_argument(p)
    p.set_defaults(func=run)


def parse_mask_arg(text: str) -> Mask | None:
    """``causal``, ``none``, ``window:W`` or ``prefix:N`` as a mask spec (None for ``none``)."""
    name, _, value = text.partition(":")
    try:
        if name == "causal" and not value:
            return Causal()
        if name == "none" and not value:
            return None
        if name == "window":
            return SlidingWindow(int(value))
        if name == "prefix":
            return PrefixLM(int(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    raise argparse.ArgumentTypeError(
        f"unknown mask {text!r}: use causal, none, window:W or prefix:N"
    )


def tokenize(text: str, kind: str) -> list[str]:
    """Words split on whitespace, or one label per UTF-8 byte (printable where possible)."""
    if kind == "words":
        return text.split()
    labels = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        printable = ch.isprintable() and byte < 128
        labels.append("␣" if ch == " " else ch if printable else f"x{byte:02x}")
    return labels


def explain(tokens: list[str], *, heads: int, dim: int, seed: int,
            mask: Mask | None, device: torch.device | str = "cpu") -> StepsTrace:
    """Run the five steps on ``tokens`` with seeded random embeddings and weights (float64)."""
    if not tokens:
        raise ValueError("the text has no tokens: give some words (or use --tokens bytes)")
    if heads < 1 or dim < 1 or dim % heads:
        raise ValueError(f"--dim {dim} must be a positive multiple of --heads {heads}")
    # The same token gets the same vector in every text (for a given seed), so repeated words
    # are visibly the same query and key; only their position (through the mask) differs.
    x = torch.stack([_token_vector(t, dim, seed) for t in tokens])
    g = torch.Generator().manual_seed(seed)
    wq, wk, wv, wo = (torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
                      for _ in range(4))
    x, wq, wk, wv, wo = (t.to(device) for t in (x, wq, wk, wv, wo))
    return attention_steps(x, wq, wk, wv, wo, n_heads=heads, mask=mask)


def _token_vector(token: str, dim: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(token.encode("utf-8")))
    return torch.randn(dim, generator=g, dtype=torch.float64)


def mask_after_softmax(trace: StepsTrace) -> Tensor:
    """The wrong order: softmax over all keys, then zero the hidden ones (rows sum to < 1)."""
    return torch.softmax(trace.biased, dim=-1) * trace.visible


def run(args: argparse.Namespace) -> int:
    """Print the explanation (or the JSON trace)."""
    tokens = tokenize(args.text, args.tokens)
    trace = explain(tokens, heads=args.heads, dim=args.dim, seed=args.seed, mask=args.mask,
                    device=resolve_device(args.device))
    if args.json:
        print(json.dumps(trace_to_json(trace, tokens, args), indent=1))
    else:
        width = min(shutil.get_terminal_size((80, 24)).columns, 120)
        print(render(trace, tokens, args, width))
    return 0


def trace_to_json(trace: StepsTrace, tokens: list[str], args: argparse.Namespace) -> dict:
    """The whole trace as JSON-ready lists (batch dimension dropped; -inf written as null)."""
    def plain(t: Tensor) -> list:
        return _inf_to_null(t[0].detach().double().tolist())

    return {
        "tokens": tokens,
        "mask": _mask_name(args.mask),
        "heads": args.heads,
        "dim": args.dim,
        "head_dim": args.dim // args.heads,
        "seed": args.seed,
        "scale": 1 / math.sqrt(args.dim // args.heads),
        "x": plain(trace.x),
        "q": plain(trace.q),
        "k": plain(trace.k),
        "v": plain(trace.v),
        "scores": plain(trace.scores),
        "scaled": plain(trace.scaled),
        "visible": trace.visible[0].tolist(),
        "masked": plain(trace.masked),
        "probs": plain(trace.probs),
        "heads_output": plain(trace.output),
        "output": plain(trace.projected),
        "mask_after_softmax_row_sums": mask_after_softmax(trace)[0].sum(-1).tolist(),
    }


def _inf_to_null(x):
    if isinstance(x, list):
        return [_inf_to_null(v) for v in x]
    return None if x == -math.inf else x


def _mask_name(mask: Mask | None) -> str:
    return "none" if mask is None else repr(mask)


# -- the text rendering ------------------------------------------------------------------------


def render(trace: StepsTrace, tokens: list[str], args: argparse.Namespace, width: int = 80) -> str:
    """The human-readable explanation, fitted to ``width`` columns."""
    d = args.dim // args.heads
    t = len(tokens)
    # One cell is kept free for the row sums of the probabilities.
    shown = max(1, min(t, (width - LABEL_WIDTH) // CELL_WIDTH - 1))
    prose_width = min(width, 80)
    out: list[str] = []
    say = out.append

    def tell(text: str) -> None:
        say(textwrap.fill(text, prose_width))

    tell(f"{t} tokens ({args.tokens}): " + " | ".join(tokens))
    tell(f"Width C={args.dim}, {args.heads} head(s) of D={d}, mask: {_mask_name(args.mask)},"
         f" seed {args.seed}. The weights are random: the numbers are arbitrary, the steps are"
         " not.")
    if shown < t:
        tell(f"(Matrices show the first {shown} of {t} tokens; widen the terminal or use --json.)")
    say("")
    tell("Step 1 - projections. Each token vector x (a row of X) is multiplied by three weight"
         " matrices: Q = X·Wq (what the token looks for), K = X·Wk (what it offers),"
         f" V = X·Wv (what it passes on). Each is split into {args.heads} head(s) of {d}"
         " numbers.")
    cols = min(d, shown)
    say(_matrix("head 0, Q (first dims)", trace.q[0, 0, :, :cols], tokens,
                [f"q{i}" for i in range(cols)], shown))
    say(_matrix("head 0, K (first dims)", trace.k[0, 0, :, :cols], tokens,
                [f"k{i}" for i in range(cols)], shown))
    for h in range(args.heads):
        say(f"=== head {h} ".ljust(prose_width - 1, "="))
        tell(f"Step 2 - scores S = Q·Kᵀ (row: query, column: key), scaled by 1/√D = 1/√{d}:")
        say(_matrix("scaled", trace.scaled[0, h], tokens, tokens, shown))
        tell("Step 3 - mask: keys a query may not see get -inf, *before* the softmax:")
        say(_matrix("masked", trace.masked[0, h], tokens, tokens, shown))
        tell("Step 4 - softmax of each row: exp, then divide by the row's sum. Hidden keys get"
             " exactly 0 and every row sums to 1:")
        say(_matrix("probs", trace.probs[0, h], tokens, tokens, shown, sums=True))
        tell("Step 5 - each token's output is its row of probabilities times V, a weighted mix"
             " of the value vectors:")
        say(_matrix("P·V", trace.output[0, h, :, :cols], tokens,
                    [f"o{i}" for i in range(cols)], shown))
    tell("Finally the heads are put side by side and multiplied by Wo: the layer's output.")
    say("")
    say(_why_mask_first(trace, tokens, shown, prose_width))
    return "\n".join(out)


def _why_mask_first(trace: StepsTrace, tokens: list[str], shown: int, width: int) -> str:
    wrong = mask_after_softmax(trace)[0, 0]
    right_sums = trace.probs[0, 0].sum(-1)
    wrong_sums = wrong.sum(-1)
    lines = [
        textwrap.fill("Why the mask goes before the softmax (head 0). Row sums of the"
                      " probabilities when masking first (right) and when masking after the"
                      " softmax (wrong):", width),
        _row("", tokens[:shown]),
        _row("right", [f"{s:.2f}" for s in right_sums[:shown].tolist()]),
        _row("wrong", [f"{s:.2f}" for s in wrong_sums[:shown].tolist()]),
    ]
    if torch.allclose(wrong_sums, right_sums):
        text = "With no key hidden the order does not matter here: every row sums to 1."
    else:
        text = ("Masking after the softmax leaves rows that sum to less than 1: hidden keys took"
                " probability mass they cannot give back, so the output is no longer an average"
                " of the visible values, and hidden keys still shaped the weights.")
    lines.append(textwrap.fill(text, width))
    return "\n".join(lines)


def _cell(v: float) -> str:
    if v == -math.inf:
        return "-inf"
    return f"{v:.2f}"


def _row(label: str, cells: list[str]) -> str:
    label = label if len(label) <= LABEL_WIDTH - 1 else label[: LABEL_WIDTH - 2] + "…"
    return f"{label:<{LABEL_WIDTH}}" + "".join(
        f"{(c if len(c) < CELL_WIDTH else c[: CELL_WIDTH - 2] + '…'):>{CELL_WIDTH}}" for c in cells
    )


def _matrix(title: str, m: Tensor, rows: list[str], cols: list[str], shown: int,
            sums: bool = False) -> str:
    m = m.detach().double()
    lines = [f"  [{title}]"]
    header = list(cols[:shown]) + (["| sum"] if sums else [])
    lines.append(_row("", header))
    for i, label in enumerate(rows[:shown]):
        cells = [_cell(v) for v in m[i, :shown].tolist()]
        if sums:
            cells.append(f"{m[i].sum().item():.2f}")
        lines.append(_row(label, cells))
    return "\n".join(lines)
