"""``maskedattn viz``: pictures, an offline page and head roles for a model on a text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Above this many tokens only some query rows are captured unless --rows says otherwise: every
# row of every head of a 12-layer, 12-head model is 144 T² numbers.
FULL_ROWS_UP_TO = 1024


def add_parser(subparsers) -> None:
    """Register ``viz``."""
    p = subparsers.add_parser(
        "viz",
        help="draw a model's attention on a text: PNG grids, an offline HTML page, head roles",
        description="Run a saved model on --text (optionally continuing it with --generate), "
        "record the attention probabilities of every layer and head from whichever backend "
        "runs, and write: attention-grid.png (every head), one PNG per notable head, "
        "attention.html (interactive, works offline) and heads.txt/heads.json (head roles: "
        "induction, previous-token, duplicate-token, first-token sink, local).",
        epilog='Example: maskedattn viz --model maskedattn-demo/model --text "ba de fi ba de"',
    )
    p.add_argument("--model", required=True,
                   help="a checkpoint directory: ours, or any transformers causal LM (GPT-2,"
                   " Llama, Qwen2, Mistral, Gemma, Phi, ...) with its tokenizer.json")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to run the model on")
    text.add_argument("--ids", help="token ids instead of text, comma-separated")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="continue the text by N greedy tokens and include them")
    p.add_argument("--out", default="maskedattn-viz", help="output directory")
    p.add_argument("--layers", type=int, nargs="+", help="layers to capture (default: all)")
    p.add_argument("--heads", type=int, nargs="+", help="heads to capture (default: all)")
    p.add_argument("--rows", type=int, nargs="+",
                   help="query positions to capture (default: all, or the last 64 beyond"
                   f" {FULL_ROWS_UP_TO} tokens)")
    p.add_argument("--format", choices=["png", "svg", "pdf"], default="png",
                   help="picture format (default png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Capture, draw, score, write."""
    from ..data.tokenizer import ByteTokenizer, load
    from ..generate import generate
    from ..model import GPT
    from ..viz import head_scores, plot_grid, plot_head, save_figure, write_html
    from ..viz import hf as viz_hf
    from ..viz.capture import capture_attention

    hf_model = viz_hf.is_transformers_directory(args.model)
    model = viz_hf.load_model(args.model) if hf_model else GPT.from_pretrained(args.model).eval()
    try:
        tokenizer = load(args.model)
    except FileNotFoundError:
        tokenizer = ByteTokenizer()
    if args.ids is not None:
        prompt = [int(x) for x in args.ids.split(",") if x.strip()]
    else:
        prompt = tokenizer.encode(args.text)
    if not prompt:
        raise ValueError("the text has no tokens")
    total = len(prompt) + args.generate
    rows = args.rows
    if rows is None and total > FULL_ROWS_UP_TO:
        rows = list(range(total - 64, total))
        print(f"{total} tokens: capturing the last 64 query rows (use --rows to choose)")
    with torch.no_grad(), capture_attention(model, layers=args.layers, heads=args.heads,
                                                      rows=rows) as cap:
        if args.generate and hf_model:
            ids = prompt + viz_hf.greedy_continuation(model, prompt, args.generate)
        elif args.generate:
            ids = prompt + generate(model, [prompt], args.generate, temperature=0)[0]
        else:
            model(torch.tensor([prompt]))
            ids = prompt
    labels = [_label(tokenizer, i) for i in ids]
    maps = cap.maps(labels, token_ids=ids,
                    generated_from=len(prompt) if args.generate else None)
    scores = head_scores(maps)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [save_figure(plot_grid(maps), out / f"attention-grid.{args.format}")]
    for role in ("induction", "previous_token", "sink"):
        ranked = scores.ranked(role, threshold=0.4)
        if ranked:
            layer, head, _ = ranked[0]
            written.append(save_figure(plot_head(maps, layer, head),
                                       out / f"{role.replace('_', '-')}-head.{args.format}"))
    written.append(write_html(maps, out / "attention.html", title=f"{args.model}: attention"))
    (out / "heads.txt").write_text(scores.table() + "\n")
    (out / "heads.json").write_text(json.dumps(scores.to_dict(), indent=1))
    print(scores.table())
    print()
    if args.generate:
        print("text: " + tokenizer.decode(ids))
    print("written: " + ", ".join(str(p) for p in written) + f", {out}/heads.txt, heads.json")
    print(f"open {out}/attention.html in a browser: pick a layer and head, hover a token")
    return 0


def _label(tokenizer, token_id: int) -> str:
    """A visible label: spaces and line breaks drawn, other invisible characters escaped."""
    if hasattr(tokenizer, "tokenizer"):  # a Hugging Face tokenizer: label its pieces as text
        from ..viz.hf import token_label

        return token_label(tokenizer, token_id)
    text = tokenizer.decode([token_id]).replace(" ", "␣").replace("\n", "↵")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "∅"
