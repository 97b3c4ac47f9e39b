"""``maskedattn train``: train a GPT on a prepared corpus or a synthetic task.

Every flag is a field of :class:`~maskedattn.train.config.TrainConfig` or, for the model's shape,
of :class:`~maskedattn.model.GPTConfig` (overriding ``--preset``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from ..model import GPTConfig
from ..model.config import CHOICES, PRESETS
from ..train.config import TrainConfig

# Flags with a closed set of values, so --help lists them and typos fail early.
_CHOICES = {
    "task": ["induction", "copying", "recall"],
    "dtype": ["float32", "bfloat16"],
    **{name: list(values) for name, values in CHOICES.items()},
}

_MODEL_FLAGS = ("vocab_size", "context", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp",
                "norm", "positions", "bias", "tie_weights", "attn_backend")


def add_parser(subparsers) -> None:
    """Register ``train``."""
    p = subparsers.add_parser(
        "train",
        help="train a GPT on a prepared corpus or a synthetic task",
        description="Train a GPT with AdamW, warmup + cosine decay, clipping and periodic "
        "evaluation. Checkpoints go to --out/step-NNNNNN/ (written atomically); --resume "
        "continues a killed run exactly. Under `torchrun --nproc_per_node=N -m maskedattn "
        "train ...` each process takes a slice of every batch (DistributedDataParallel); "
        "--context-parallel C splits each sequence over C of them (ring attention) and --fsdp "
        "shards the model (FSDP2). A run resumes on any number of processes.",
        epilog="Examples:\n  maskedattn train --task induction --steps 300 --out runs/ind\n"
        "  maskedattn train --data corpus/ --preset tiny --n-layer 6 --out runs/lm\n"
        "  maskedattn train --task induction --steps 600 --track-heads --no-progress\n"
        "  maskedattn train --resume runs/lm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--resume", metavar="DIR",
                   help="continue a run from its directory (newest checkpoint) or a checkpoint;"
                   " the run keeps its own settings and output directory")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: print one plain line per log interval (--log-every)"
                   " and per evaluation instead (for logs and pipes)")
    _CHOICES["preset"] = sorted(PRESETS)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        _add_field(p, f.name, hints[f.name], f.metadata["help"], f.default)
    group = p.add_argument_group("model shape (override the preset; see GPTConfig)")
    model_hints = typing.get_type_hints(GPTConfig)
    for name in _MODEL_FLAGS:
        _add_field(group, name, model_hints[name], f"GPTConfig.{name}", None, dest=f"m_{name}")
    p.set_defaults(func=run)


def _add_field(p, name: str, hint, help: str, default, dest: str | None = None) -> None:
    flag = "--" + name.replace("_", "-")
    dest = dest or name
    base = _base_type(hint)
    if base is bool:
        p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                       help=help)
    else:
        shown = f" (default: {default})" if default not in (None, ()) else ""
        p.add_argument(flag, dest=dest, type=base, default=default, help=help + shown,
                       metavar=name.upper(), choices=_CHOICES.get(name))


def _base_type(hint):
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe."""
    model = tuple(sorted((name, getattr(args, f"m_{name}")) for name in _MODEL_FLAGS
                         if getattr(args, f"m_{name}") is not None))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name != "model"}
    return TrainConfig(**values, model=model)


def run(args: argparse.Namespace) -> int:
    """Train, then say where the results are."""
    from ..train.loop import train

    # A resumed run keeps its own settings; the other flags are for new runs.
    config = None if args.resume else config_from_args(args)
    # The processes' layout belongs to this launch, not to the run: a resume may change it.
    layout = {"context_parallel": args.context_parallel, "fsdp": args.fsdp} \
        if args.resume else None
    result = train(config, resume=args.resume, progress="lines" if args.no_progress else "bar",
                   layout=layout)
    if result.checkpoint is not None:
        out = result.checkpoint.parent
        print(f"checkpoint: {result.checkpoint}")
        print(f"metrics: {out}/metrics.jsonl, loss curve: {out}/loss.png")
        if (out / "heads.png").is_file():
            print(f"heads' role scores against the step: {out}/heads.png")
        if (out / "tensorboard").is_dir():
            print(f"TensorBoard: tensorboard --logdir {out}/tensorboard")
        print(f"sample from it: maskedattn generate --model {result.checkpoint} --prompt ...")
    return 0
