"""``maskedattn viz``: pictures, an offline page and head roles for a model on a text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ._device import add_device_argument, resolve_device

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
    p.add_argument("--model", help="a checkpoint directory: ours, or any transformers causal LM"
                   " (GPT-2, Llama, Qwen2, Mistral, Gemma, Phi, ...) with its tokenizer.json")
    p.add_argument("--run", metavar="DIR",
                   help="instead of --model: a training run's directory; its newest checkpoint"
                   " is drawn, and attention-steps.html gets a step slider over the maps of"
                   " every kept checkpoint on the same text")
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
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Capture, draw, score, write."""
    from ..data.tokenizer import ByteTokenizer, for_model, load, printable
    from ..generate import generate
    from ..model import GPT
    from ..viz import head_scores, page_extras, plot_grid, plot_head, save_figure, write_html
    from ..viz import hf as viz_hf
    from ..viz.capture import capture_attention

    device = resolve_device(args.device)
    if (args.model is None) == (args.run is None):
        raise ValueError("give --model DIR (a checkpoint) or --run DIR (a training run)")
    if args.run is not None:  # the newest checkpoint stands for the run
        from ._run_steps import run_checkpoints

        checkpoints = run_checkpoints(args.run)
        args.model = str(checkpoints[-1])
    hf_model = viz_hf.is_transformers_directory(args.model)
    if hf_model:
        model = viz_hf.load_model(args.model).to(device)
        tokenizer = load(args.model)
    else:
        model = GPT.from_pretrained(args.model, device=device).eval()
        if args.text is not None:  # text needs the model's own tokenizer
            tokenizer = for_model(args.model, model.config.vocab_size)
        else:
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
            model(torch.tensor([prompt], device=device))
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
    # The q·k view and the direct effects redo every layer's T x T steps: short inputs only.
    extras = None
    if total <= 256:
        try:
            extras = page_extras(model, ids, lambda i: _label(tokenizer, i))
        except (TypeError, ValueError) as err:  # a layout the step adapters do not know
            print(f"(no q·k view or direct effects on the page: {err})")
    written.append(write_html(maps, out / "attention.html", title=f"{args.model}: attention",
                              extras=extras))
    if args.run is not None:
        from ._run_steps import write_run_steps

        written.append(write_run_steps(checkpoints, maps, out / "attention-steps.html",
                                       device=device, title=f"{args.run}: attention by step"))
    (out / "heads.txt").write_text(scores.table() + "\n")
    (out / "heads.json").write_text(json.dumps(scores.to_dict(), indent=1))
    print(scores.table())
    print()
    if args.generate:
        print("text: " + printable(tokenizer.decode(ids)))
    print("written: " + ", ".join(str(p) for p in written) + f", {out}/heads.txt, heads.json")
    print(f"open {out}/attention.html in a browser: pick a layer and head, hover a token")
    if args.run is not None:
        print(f"open {out}/attention-steps.html: drag its slider over the run's checkpoints")
    return 0


def _label(tokenizer, token_id: int) -> str:
    """A visible label: spaces and line breaks drawn, other invisible characters escaped."""
    if hasattr(tokenizer, "tokenizer"):  # a Hugging Face tokenizer: label its pieces as text
        from ..viz.hf import token_label

        return token_label(tokenizer, token_id)
    text = tokenizer.decode([token_id]).replace(" ", "␣").replace("\n", "↵")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "∅"
