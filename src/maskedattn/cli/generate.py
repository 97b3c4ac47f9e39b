"""``maskedattn generate``: continue a prompt with a saved model."""

from __future__ import annotations

import argparse
import sys

import torch

from ..data.tokenizer import for_model
from ..generate import generate, stream
from ..model import GPT
from ._device import add_device_argument, resolve_device

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def add_parser(subparsers) -> None:
    """Register ``generate``."""
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a saved model",
        description="Continue PROMPT with the model in DIR (ours or a transformers GPT-2). Text "
        "is tokenised with the tokenizer saved beside the model (tokenizer.json), --tokenizer, "
        "or as UTF-8 bytes when there is none and the model's vocabulary is bytes. Prints the "
        "prompt and its continuation (with --ids: the token ids).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--ids", help="token ids to continue instead, comma-separated; prints"
                        " ids (no tokenizer needed)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer directory or tokenizer.json (default: the model's own)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (default 64)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0: greedy; below 1 sharper, above 1 flatter (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the likeliest tokens holding probability p")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already present (default 1: none)")
    p.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                   help="stop after this token id (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="compute dtype (default: as stored)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: a compile of ~20 s (GPT-2 124M, two"
                   " cores) first, then faster tokens; worth it for long outputs")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load, tokenise, generate, print."""
    model = GPT.from_pretrained(args.model, dtype=_DTYPES.get(args.dtype),
                                device=resolve_device(args.device))
    if args.ids is not None:
        return _run_ids(model, args)
    tokenizer = for_model(args.model, model.config.vocab_size, args.tokenizer)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt encodes to no tokens; give some text")
    steps = stream(model, [prompt], args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, stop_tokens=args.stop_token,
                   seed=args.seed, compile=args.compile)
    ids = list(prompt)
    shown = ""
    for (token,) in steps:
        if token is None:
            break
        ids.append(token)
        if args.stream:
            shown = _show_new(tokenizer.decode(ids), shown)
    text = tokenizer.decode(ids)
    _write(text[len(shown):] + "\n")
    return 0


def _run_ids(model: GPT, args: argparse.Namespace) -> int:
    try:
        prompt = [int(x) for x in args.ids.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    if not prompt:
        raise ValueError("--ids holds no token id")
    new = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, stop_tokens=args.stop_token,
                   seed=args.seed, compile=args.compile)[0]
    print(",".join(map(str, prompt + new)))
    return 0


def _write(text: str) -> None:
    """Write ``text`` with the bytes a byte tokenizer kept (lone surrogates) as those bytes."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode(sys.stdout.encoding or "utf-8", "surrogateescape"))
    sys.stdout.flush()


def _show_new(text: str, shown: str) -> str:
    """Print what ``text`` adds to ``shown``; hold back a character still being assembled."""
    if text and "\udc80" <= text[-1] <= "\udcff":  # bytes of a character not all here yet
        return shown
    _write(text[len(shown):])
    return text
