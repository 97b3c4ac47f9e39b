"""``maskedattn explain``: the five steps of masked self-attention, printed (or as a page).

Two modes. Without ``--model``, the text's tokens get seeded random vectors and the projections
seeded random weights: nothing is trained, so the numbers mean nothing in themselves; what the
command shows is *how* each step transforms the previous one, and what the mask does. With
``--model DIR``, the same steps run on a trained model's real weights and on the real input of
the chosen layer (the residual stream after the layer's norm), so the numbers are the model's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import textwrap
import zlib
from pathlib import Path

import torch
from torch import Tensor

from ..attention.masks import Causal, Mask, PrefixLM, SlidingWindow
from ..attention.reference import AttentionTrace, attention_steps
from ..viz.steps import LayerSteps, LayerWeights
from ._device import add_device_argument, resolve_device

LABEL_WIDTH = 8
CELL_WIDTH = 7
WORKED_KEYS = 12  # keys worked through cell by cell; the rest are summarised


def add_parser(subparsers) -> None:
    """Register ``explain``."""
    p = subparsers.add_parser(
        "explain",
        help="print every step of masked self-attention on a text (random or a model's weights)",
        description=textwrap.fill(
            "Run the five steps of masked self-attention (projections, positions, raw scores and"
            " scaling, mask, softmax, weighted sum of values, output projection) on the tokens of"
            " TEXT and print each step's matrix, tokens on rows (queries) and columns (keys), then"
            " work one query's row through cell by cell. Without --model the weights are small"
            " seeded random ones; with --model they are the model's own, and the input is what"
            " the chosen layer really receives (after its norm). --html writes the same as an"
            " interactive page that works offline.", 78),
        epilog='Examples: maskedattn explain "the cat sat on the mat" --mask window:2\n'
        '  maskedattn explain --model maskedattn-demo/model --ids 3,17,40,3,17 --token 4\n'
        '  maskedattn explain --model run/ckpt --text "to be or not to be" --html steps.html',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("text", nargs="?", help="the text to tokenise (quote it); or use --text")
    p.add_argument("--text", dest="text_opt", metavar="TEXT", help="the text, as an option")
    p.add_argument("--model", metavar="DIR",
                   help="a checkpoint directory (ours or GPT-2's): use its real weights")
    p.add_argument("--ids", help="with --model: token ids instead of text, comma-separated")
    p.add_argument("--layer", type=int, help="with --model: the layer to explain (default: the"
                   " layer of the most telling head)")
    p.add_argument("--head", type=int, help="the head to show (default: with --model the head"
                   " with the highest role score, else 0)")
    p.add_argument("--token", type=int, default=-1,
                   help="the query token worked through cell by cell (default -1: the last;"
                   " negative counts from the end)")
    p.add_argument("--html", metavar="FILE", help="also write the steps as an offline page")
    p.add_argument("--tokens", choices=["words", "bytes"], default="words",
                   help="without --model: split the text into words (default) or UTF-8 bytes")
    p.add_argument("--heads", type=int, default=2, help="without --model: heads (default 2)")
    p.add_argument("--dim", type=int, default=16, help="without --model: model width C;"
                   " each head gets C/heads dimensions (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--mask", default="causal", type=parse_mask_arg, metavar="MASK",
                   help="without --model: causal (default), none (vanilla bidirectional"
                   " self-attention), window:W (causal, last W tokens) or prefix:N"
                   " (bidirectional inside the first N tokens)")
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
            mask: Mask | None, device: torch.device | str = "cpu") -> LayerSteps:
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
    trace = attention_steps(x, wq, wk, wv, wo, n_heads=heads, mask=mask)
    weights = LayerWeights(wq, wk, wv, wo, None, None, None, None, heads, heads)
    return LayerSteps(0, weights, "none", trace.x[0], trace.q[0], trace.k[0], trace.v[0],
                      trace.q[0], trace.k[0], trace, trace.concat[0], trace.projected[0])


def _token_vector(token: str, dim: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(token.encode("utf-8")))
    return torch.randn(dim, generator=g, dtype=torch.float64)


def mask_after_softmax(trace: AttentionTrace) -> Tensor:
    """The wrong order: softmax over all keys, then zero the hidden ones (rows sum to < 1)."""
    return torch.softmax(trace.biased, dim=-1) * trace.visible


class Explained:
    """What one run explains: the steps of a layer, its tokens, the head and the query chosen."""

    def __init__(self, steps: LayerSteps, tokens: list[str], head: int, token: int,
                 source: str, ids: list | None = None, mask: str = "Causal()") -> None:
        h, t = steps.weights.n_heads, len(tokens)
        if not 0 <= head < h:
            raise ValueError(f"--head {head} is out of range: the layer has {h} heads"
                             f" (0 .. {h - 1})")
        if not -t <= token < t:
            raise ValueError(f"--token {token} is out of range: the text has {t} tokens")
        self.steps, self.tokens, self.head, self.token = steps, tokens, head, token % t
        self.source, self.mask = source, mask
        self.ids = ids if ids is not None else tokens


def _model_explained(args: argparse.Namespace, text: str | None) -> Explained:
    from ..data.tokenizer import ByteTokenizer, load
    from ..model import GPT
    from ..viz import AttentionMaps, head_scores
    from ..viz.html import most_telling_head
    from ..viz.steps import model_steps
    from .viz import _label

    model = GPT.from_pretrained(args.model).eval()
    try:
        tokenizer = load(args.model)
    except FileNotFoundError:
        tokenizer = ByteTokenizer()
    if args.ids is not None:
        ids = [int(x) for x in args.ids.split(",") if x.strip()]
        labels = [str(i) for i in ids] if isinstance(tokenizer, ByteTokenizer) and \
            model.config.vocab_size != 256 else [_label(tokenizer, i) for i in ids]
    else:
        ids = tokenizer.encode(text)
        labels = [_label(tokenizer, i) for i in ids]
    if not ids:
        raise ValueError("the text has no tokens")
    all_steps, _ = model_steps(model, ids)
    layer, head = args.layer, args.head
    if layer is None or head is None:
        maps = AttentionMaps(torch.stack([s.trace.probs[0] for s in all_steps]).float(), labels,
                             token_ids=ids)
        best = most_telling_head(head_scores(maps), layer)
        layer, head = (best[0] if layer is None else layer), (best[1] if head is None else head)
    n = len(all_steps)
    if not 0 <= layer < n:
        raise ValueError(f"--layer {layer} is out of range: the model has {n} layers"
                         f" (0 .. {n - 1})")
    return Explained(all_steps[layer], labels, head, args.token,
                     f"{args.model}, layer {layer} of {n}", ids)


def run(args: argparse.Namespace) -> int:
    """Print the explanation (or the JSON trace), and write the page when asked."""
    text = args.text_opt if args.text_opt is not None else args.text
    if args.model is not None:
        if text is None and args.ids is None:
            raise ValueError("--model needs a text (TEXT or --text) or --ids")
        ex = _model_explained(args, text)
    else:
        if args.ids is not None or args.layer is not None:
            raise ValueError("--ids and --layer need --model")
        if text is None:
            raise ValueError("give a text to explain (TEXT or --text)")
        tokens = tokenize(text, args.tokens)
        steps = explain(tokens, heads=args.heads, dim=args.dim, seed=args.seed, mask=args.mask,
                        device=resolve_device(args.device))
        ex = Explained(steps, tokens, args.head or 0, args.token,
                       f"random weights, seed {args.seed}, mask: {_mask_name(args.mask)}",
                       mask=_mask_name(args.mask))
    if args.json:
        print(json.dumps(trace_to_json(ex), indent=1))
    else:
        width = min(shutil.get_terminal_size((80, 24)).columns, 120)
        print(render(ex, width))
    if args.html:
        from ..viz.steps_html import write_steps_html

        path = write_steps_html(ex.steps, ex.tokens, Path(args.html), head=ex.head,
                                token=ex.token, title=f"The five steps: {ex.source}")
        print(f"\nwritten: {path} (open it in a browser; it works offline)")
    return 0


def trace_to_json(ex: Explained) -> dict:
    """The whole trace as JSON-ready lists (every head; -inf written as null)."""
    s, tr = ex.steps, ex.steps.trace

    def plain(t: Tensor) -> list:
        return _inf_to_null(t.detach().double().tolist())

    return {
        "tokens": ex.tokens,
        "source": ex.source,
        "mask": ex.mask,
        "heads": s.weights.n_heads,
        "dim": s.x.shape[-1],
        "head_dim": s.weights.head_dim,
        "scale": s.scale,
        "positions": s.positions_kind,
        "x": plain(s.x),
        "q_before_positions": plain(s.q_raw),
        "q": plain(s.q),
        "k": plain(s.k),
        "v": plain(s.v),
        "scores": plain(tr.scores[0]),
        "scaled": plain(tr.scaled[0]),
        "visible": tr.visible[0].tolist(),
        "masked": plain(tr.masked[0]),
        "probs": plain(tr.probs[0]),
        "heads_output": plain(tr.output[0]),
        "output": plain(s.projected),
        "mask_after_softmax_row_sums": mask_after_softmax(tr)[0].sum(-1).tolist(),
    }


def _inf_to_null(x):
    if isinstance(x, list):
        return [_inf_to_null(v) for v in x]
    return None if x == -math.inf else x


def _mask_name(mask: Mask | None) -> str:
    return "none" if mask is None else repr(mask)


# -- the text rendering ------------------------------------------------------------------------


def render(ex: Explained, width: int = 80) -> str:
    """The human-readable explanation, fitted to ``width`` columns."""
    s, tr, h, tokens = ex.steps, ex.steps.trace, ex.head, ex.tokens
    w = s.weights
    d, c, t = w.head_dim, s.x.shape[-1], len(tokens)
    # One cell is kept free for the row sums of the probabilities.
    fit = max(1, (width - LABEL_WIDTH) // CELL_WIDTH)
    shown = max(1, min(t, fit - 1))
    prose_width = min(width, 80)
    out: list[str] = []
    say = out.append

    def tell(text: str) -> None:
        say(textwrap.fill(text, prose_width))

    def dims(n: int) -> tuple[int, str]:
        k = min(n, fit)
        return k, (f"all {n} dims" if k == n else f"dims 0-{k - 1} of {n}")

    kv = h // (w.n_heads // w.n_kv_heads)  # the key/value head this query head reads
    tell(f"{t} tokens: " + " | ".join(tokens))
    tell(f"{ex.source}. Width C={c}, {w.n_heads} head(s) of D={d}"
         + (f" ({w.n_kv_heads} key/value heads)" if w.n_kv_heads != w.n_heads else "")
         + f"; showing head {h}.")
    if ex.source.startswith("random"):
        tell("The weights are random: the numbers are arbitrary, the steps are not.")
    if shown < t:
        tell(f"(Matrices show the first {shown} of {t} tokens; widen the terminal or use --json"
             " or --html.)")
    say("")
    xd, xl = dims(c)
    tell("Step 0 - the input X: one row per token"
         + (" (the residual stream after the layer's norm: exactly what the layer reads)."
            if not ex.source.startswith("random") else " (a seeded random vector per word)."))
    say(_matrix(f"X, {xl}", s.x[:, :xd], tokens, [f"x{i}" for i in range(xd)], shown))
    hd, hl = dims(d)
    bias = " + b" if w.bq is not None else ""
    tell("Step 1 - projections. Each row of X is multiplied by three weight matrices:"
         f" Q = X·Wq{bias} (what the token looks for), K = X·Wk{bias} (what it offers),"
         f" V = X·Wv{bias} (what it passes on), each split into {w.n_heads} head(s) of {d}"
         " numbers.")
    for name, m in (("Q", s.q_raw[h]), ("K", s.k_raw[kv]), ("V", s.v[kv])):
        say(_matrix(f"head {h}, {name}, {hl}", m[:, :hd], tokens,
                    [f"{name.lower()}{i}" for i in range(hd)], shown))
    say(_positions_step(ex, shown, hd, hl, prose_width))
    tell(f"Step 2 - raw scores S = Q·Kᵀ (row: query, column: key; cell = q·k), then scaled by"
         f" {s.scale:.4g}" + (f" = 1/√D = 1/√{d}" if abs(s.scale - d ** -0.5) < 1e-12 else "")
         + " so the softmax does not saturate as D grows:")
    say(_matrix("raw QKᵀ", tr.scores[0, h], tokens, tokens[:shown], shown))
    say(_matrix("scaled", tr.scaled[0, h], tokens, tokens[:shown], shown))
    tell("Step 3 - mask: keys a query may not see get -inf, *before* the softmax:")
    say(_matrix("masked", tr.masked[0, h], tokens, tokens[:shown], shown))
    tell("Step 4 - softmax of each row: exp, then divide by the row's sum. Hidden keys get"
         " exactly 0 and every row sums to 1:")
    say(_matrix("probs", tr.probs[0, h], tokens, tokens[:shown], shown, sums=True))
    tell("Step 5 - each token's output is its row of probabilities times V, a weighted mix of"
         " the value vectors:")
    say(_matrix(f"P·V, {hl}", tr.output[0, h, :, :hd], tokens, [f"o{i}" for i in range(hd)],
                shown))
    tell(f"Step 6 - the {w.n_heads} heads' outputs side by side (T×{w.n_heads * d}), times Wo"
         + (" + bo" if w.bo is not None else "") + ": the layer's output, added to the residual"
         " stream.")
    say(_matrix(f"output, {xl}", s.projected[:, :xd], tokens, [f"y{i}" for i in range(xd)],
                shown))
    say("")
    say(_worked_row(ex, prose_width))
    say("")
    say(_why_mask_first(tr, h, tokens, shown, prose_width))
    return "\n".join(out)


def _positions_step(ex: Explained, shown: int, hd: int, hl: str, width: int) -> str:
    s, h, tokens = ex.steps, ex.head, ex.tokens
    kv = h // (s.weights.n_heads // s.weights.n_kv_heads)
    lines: list[str] = []
    if s.positions_kind == "rope":
        lines.append(textwrap.fill(
            "Step 1b - positions (RoPE): q and k are rotated, pair of dims by pair of dims, by"
            " angles that grow with the token's position, so q·k depends on how far apart two"
            " tokens are. V is not rotated.", width))
        lines.append(_matrix(f"head {h}, Q rotated, {hl}", s.q[h, :, :hd], tokens,
                             [f"q{i}" for i in range(hd)], shown))
        lines.append(_matrix(f"head {h}, K rotated, {hl}", s.k[kv, :, :hd], tokens,
                             [f"k{i}" for i in range(hd)], shown))
    elif s.positions_kind == "learned":
        lines.append(textwrap.fill(
            "Step 1b - positions: this model adds a learned position vector to each token's"
            " embedding before the first layer, so X already carries the positions; attention"
            " itself adds none.", width))
    else:
        lines.append(textwrap.fill(
            "Step 1b - positions: none. Attention by itself does not know the order of the"
            " tokens: only the mask (which keys each query may see) depends on position.", width))
    same = _equal_rows(ex.ids, s.q_raw[h], s.k_raw[kv])
    if same:
        (a, b), word = same[0], tokens[same[0][0]]
        lines.append(textwrap.fill(
            f"Note: {word!r} at positions {a} and {b} has the same row of Q and of K (before"
            " positions): attention alone has no notion of position, so equal tokens look for"
            " and offer the same thing. Only "
            + ("the rotation of step 1b" if s.positions_kind == "rope" else "the mask")
            + " tells them apart.", width))
    return "\n".join(lines)


def _equal_rows(ids: list, q: Tensor, k: Tensor) -> list[tuple[int, int]]:
    first: dict = {}
    pairs = []
    for i, token in enumerate(ids):
        if token in first:
            j = first[token]
            if torch.allclose(q[i], q[j]) and torch.allclose(k[i], k[j]):
                pairs.append((j, i))
        else:
            first[token] = i
    return pairs


def _worked_row(ex: Explained, width: int) -> str:
    """Query ``ex.token``'s row of head ``ex.head``, cell by cell."""
    s, tr, h, i, tokens = ex.steps, ex.steps.trace, ex.head, ex.token, ex.tokens
    d = s.weights.head_dim
    q = s.q[h, i]
    kv = h // (s.weights.n_heads // s.weights.n_kv_heads)
    keys = s.k[kv]
    visible = tr.visible[0, 0 if tr.visible.shape[1] == 1 else h, i]
    scaled = tr.scaled[0, h, i]
    probs = tr.probs[0, h, i]
    lines = [textwrap.fill(
        f"One row worked through: query {i} {tokens[i]!r}, head {h}. Its score with each key is"
        f" the dot product of two {d}-number vectors, q·k = Σ q[d]·k[d]:", width)]
    finite = scaled[visible]
    row_max = finite.max().item() if finite.numel() else 0.0
    total = torch.exp(finite - row_max).sum().item() if finite.numel() else 0.0
    lines.append(textwrap.fill(
        f"q = [{', '.join(f'{v:.2f}' for v in q[:8].tolist())}{', …' if d > 8 else ''}]", width))
    order = list(range(len(tokens)))
    if len(order) > WORKED_KEYS:  # the strongest keys, in position order
        order = sorted(sorted(order, key=lambda j: -probs[j].item())[:WORKED_KEYS])
    for j in order:
        terms = [f"({a:.2f})({b:.2f})" for a, b in zip(q[:3].tolist(), keys[j, :3].tolist(),
                                                       strict=True)]
        more = f" + … {d - 3} more" if d > 3 else ""
        raw = tr.scores[0, h, i, j].item()
        head = f"key {j} {tokens[j]!r}: q·k = {' + '.join(terms)}{more} = {raw:.3f}"
        if not visible[j]:
            lines.append(textwrap.fill(f"{head}; hidden by the mask: -inf, weight 0", width,
                                       subsequent_indent="    "))
            continue
        e = math.exp(scaled[j].item() - row_max)
        lines.append(textwrap.fill(
            f"{head}; × {s.scale:.3g} = {scaled[j].item():.3f}; exp({scaled[j].item():.3f} −"
            f" {row_max:.3f}) = {e:.4f}; / {total:.4f} = {probs[j].item():.4f}", width,
            subsequent_indent="    "))
    if len(order) < len(tokens):
        lines.append(f"  ({len(tokens) - len(order)} weaker keys left out; --json has them all)")
    v = s.v[kv]
    o = tr.output[0, h, i]
    top = sorted(range(len(tokens)), key=lambda j: -probs[j].item())[:3]
    expr = " + ".join(f"{probs[j].item():.3f}·{v[j, 0].item():.2f}" for j in top)
    lines.append(textwrap.fill(
        f"Output of the head for query {i}: o = Σ p_j·v_j, dim 0 = {expr}"
        f"{' + …' if len(tokens) > 3 else ''} = {o[0].item():.3f}; all dims: ["
        + ", ".join(f"{x:.2f}" for x in o[:8].tolist()) + (", …]" if d > 8 else "]"), width))
    y = s.projected[i]
    lines.append(textwrap.fill(
        f"After Wo (every head's output side by side, times Wo), the layer adds to token {i}'s"
        " residual stream: [" + ", ".join(f"{x:.2f}" for x in y[:8].tolist())
        + (", …]" if y.numel() > 8 else "]"), width))
    return "\n".join(lines)


def _why_mask_first(trace: AttentionTrace, h: int, tokens: list[str], shown: int,
                    width: int) -> str:
    wrong = mask_after_softmax(trace)[0, h]
    right_sums = trace.probs[0, h].sum(-1)
    wrong_sums = wrong.sum(-1)
    lines = [
        textwrap.fill(f"Why the mask goes before the softmax (head {h}). Row sums of the"
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
    """The first ``shown`` rows of ``m`` under the column labels ``cols`` (one per column)."""
    m = m.detach().double()
    lines = [f"  [{title}]"]
    header = list(cols) + (["| sum"] if sums else [])
    lines.append(_row("", header))
    for i, label in enumerate(rows[:shown]):
        cells = [_cell(v) for v in m[i, :len(cols)].tolist()]
        if sums:
            cells.append(f"{m[i].sum().item():.2f}")
        lines.append(_row(label, cells))
    return "\n".join(lines)
