"""``maskedattn generate``: continue a prompt with a saved model."""

from __future__ import annotations

import argparse
import sys

import torch

from ..data.tokenizer import ByteTokenizer, Tokenizer, load
from ..generate import stream
from ..model import GPT
from ._device import add_device_argument, resolve_device

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def add_parser(subparsers) -> None:
    """Register ``generate``."""
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a saved model",
        description="Continue PROMPT with the model in DIR (ours or a transformers GPT-2). Text "
        "is tokenised with the tokenizer saved beside the model (tokenizer.json), or as "
        "UTF-8 bytes when there is none. Prints the prompt and its continuation.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
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
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load, tokenise, generate, print."""
    model = GPT.from_pretrained(args.model, dtype=_DTYPES.get(args.dtype),
                                device=resolve_device(args.device))
    tokenizer = _tokenizer(args.model)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt encodes to no tokens; give some text")
    steps = stream(model, [prompt], args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, stop_tokens=args.stop_token,
                   seed=args.seed)
    ids = list(prompt)
    shown = ""
    for (token,) in steps:
        if token is None:
            break
        ids.append(token)
        if args.stream:
            shown = _show_new(tokenizer.decode(ids), shown)
    text = tokenizer.decode(ids)
    if args.stream:
        sys.stdout.write(text[len(shown):] + "\n")
    else:
        print(text)
    return 0


def _tokenizer(directory: str) -> Tokenizer:
    try:
        return load(directory)
    except FileNotFoundError:
        return ByteTokenizer()


def _show_new(text: str, shown: str) -> str:
    """Print what ``text`` adds to ``shown``; hold back a character still being assembled."""
    if text.endswith("\ufffd"):  # a multi-byte character whose bytes are not all here yet
        return shown
    sys.stdout.write(text[len(shown):])
    sys.stdout.flush()
    return text
