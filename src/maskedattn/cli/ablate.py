"""``maskedattn ablate``: switch each head off in turn; report what it does to loss and accuracy."""

from __future__ import annotations

import argparse

import torch


def add_parser(subparsers) -> None:
    """Register ``ablate``."""
    p = subparsers.add_parser(
        "ablate",
        help="ablate each attention head in turn and report the loss and accuracy it costs",
        description="Load a model, then for every head (or those given) run it with that head "
        "ablated (its output set to zero, or to its mean) and print the next-token loss and "
        "top-1 accuracy beside the intact model's: causal evidence of what a head does. Score "
        "on a synthetic task (--task: only the positions the task determines are scored) or on "
        "a text (--text: every next token).",
        epilog="Example: maskedattn ablate --model maskedattn-demo/model --task induction "
        "--group 1:0,1:1,1:2",
    )
    p.add_argument("--model", required=True, help="a checkpoint directory (ours or GPT-2's)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--task", choices=["induction", "copying", "recall"],
                      help="score on fresh sequences of this synthetic task")
    data.add_argument("--text", help="score next-token prediction on this text")
    p.add_argument("--task-size", type=int, default=16,
                   help="the task's length (or pairs, for recall; default 16, the demo's)")
    p.add_argument("--batch", type=int, default=256, help="task sequences (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task's sequences")
    p.add_argument("--how", choices=["zero", "mean"], default="zero",
                   help="zero: the head writes nothing; mean: its output is replaced by its mean"
                   " over the batch and positions (default zero)")
    p.add_argument("--heads", nargs="+", type=parse_head, metavar="L:H",
                   help="heads to ablate one at a time (default: every head)")
    p.add_argument("--group", action="append", default=[], type=parse_group, metavar="L:H,L:H",
                   help="also ablate these heads together (repeatable)")
    p.set_defaults(func=run)


def parse_head(text: str) -> tuple[int, int]:
    """``L:H`` as (layer, head)."""
    layer, sep, head = text.partition(":")
    try:
        if sep:
            return int(layer), int(head)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"a head is LAYER:HEAD, e.g. 1:0, got {text!r}")


def parse_group(text: str) -> list[tuple[int, int]]:
    """``L:H,L:H,...`` as a list of (layer, head)."""
    return [parse_head(part) for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    """Load, score intact and ablated, print the table."""
    from ..data.tasks import IGNORE, make_task
    from ..data.tokenizer import ByteTokenizer, load
    from ..model import GPT
    from ..viz.ablate import ablation_table

    model = GPT.from_pretrained(args.model).eval()
    if args.task is not None:
        task = make_task(args.task, model.config.vocab_size, args.task_size)
        if task.seq_len > model.config.context:
            raise ValueError(f"--task-size {args.task_size} makes sequences of {task.seq_len}"
                             f" tokens, beyond the model's context of {model.config.context}")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        batch = task.sample(args.batch, torch.Generator().manual_seed(args.seed))
        tokens, targets = batch.tokens, batch.targets
        what = f"{args.task} task, {args.batch} sequences, scored positions only"
    else:
        try:
            tokenizer = load(args.model)
        except FileNotFoundError:
            tokenizer = ByteTokenizer()
        ids = tokenizer.encode(args.text)
        if len(ids) < 2:
            raise ValueError("--text needs at least two tokens (one to predict from, one to"
                             " predict)")
        tokens = torch.tensor([ids[: model.config.context]])
        targets = tokens.roll(-1, 1)
        targets[:, -1] = IGNORE
        what = f"the text, {tokens.shape[1]} tokens"
    rows = ablation_table(model, tokens, targets, heads=args.heads, groups=args.group,
                          how=args.how)
    print(format_table(rows, f"Ablating heads ({args.how}) of {args.model} on {what}:"))
    return 0


def format_table(rows, title: str) -> str:
    """The ablation rows as a plain table: loss, change in loss, accuracy."""
    base = rows[0]
    lines = [title, f"{'ablated':<24} {'loss':>8} {'Δloss':>8} {'accuracy':>9}"]
    for r in rows:
        name = "none (intact model)" if not r.heads else \
            " + ".join(f"L{layer}H{head}" for layer, head in r.heads)
        delta = "" if not r.heads else f"{r.loss - base.loss:+8.3f}"
        lines.append(f"{name:<24} {r.loss:>8.3f} {delta:>8} {r.accuracy:>9.1%}")
    return "\n".join(lines)
