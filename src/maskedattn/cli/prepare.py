"""``maskedattn prepare``: text files to a tokenizer and token shards for ``maskedattn train``."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    """Register ``prepare``."""
    p = subparsers.add_parser(
        "prepare",
        help="tokenise text files into shards for training",
        description="Stream text files into memory-mapped token shards (uint16 or uint32) with "
        "a train/validation split, a manifest.json and the tokenizer, all in --out. The corpus "
        "is never loaded whole into memory.",
        epilog="Examples:\n  maskedattn prepare --input notes.txt --out corpus\n"
        "  maskedattn prepare --input 'books/**/*.txt' --tokenizer bpe --vocab-size 8192 "
        "--out corpus\n  maskedattn prepare --input src/ --suffix .py --tokenizer chars "
        "--out corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE|DIR|GLOB",
                   help="text files, directories (searched recursively) or glob patterns")
    p.add_argument("--out", required=True, help="directory to write the corpus into")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|chars|bpe|DIR",
                   help="bytes (default), chars (trained on the input), bpe (byte-level BPE"
                   " trained on the input), or a directory holding a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size of a trained BPE (default 4096; bpe only)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the text held out for validation, in blocks of 4 KiB"
                   " (default 0.1)")
    p.add_argument("--suffix", action="append", metavar=".EXT",
                   help="in directories, only files ending so (repeatable; default: all"
                   " non-binary files)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare, with a progress bar over the input's size."""
    from tqdm.auto import tqdm

    from ..data.prepare import prepare
    from .errors import output_directory

    output_directory(args.out)
    bar = None

    def start(total: int) -> None:
        nonlocal bar
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenising",
                   disable=args.no_progress)

    manifest = prepare(args.input, args.out, tokenizer=args.tokenizer,
                       vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                       suffixes=args.suffix, on_files=start,
                       progress=lambda n: bar.update(n))
    if bar is not None:
        bar.close()
    counts = {"train": 0, "val": 0}
    for shard in manifest["shards"]:
        counts[shard["split"]] += shard["tokens"]
    print(f"{args.out}: {counts['train']:,} training and {counts['val']:,} validation tokens,"
          f" vocabulary {manifest['vocab_size']:,} ({manifest['dtype']}),"
          f" {manifest['tokenizer']['files']} files")
    for kind, what in (("not_regular", "not regular files (FIFOs, sockets, devices)"),
                       ("binary", "binary files")):
        names = manifest["skipped"].get(kind, [])
        if names:
            print(f"skipped {len(names)} {what}: " + ", ".join(names[:3])
                  + (", ..." if len(names) > 3 else ""))
    if counts["val"] == 0:
        print("note: no validation tokens; give more text or a larger --val-fraction")
    print(f"train on it: maskedattn train --data {args.out} --out runs/my-model")
    return 0
