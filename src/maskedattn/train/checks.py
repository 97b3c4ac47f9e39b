"""The numbers of a :class:`~maskedattn.train.config.TrainConfig`, checked before any work.

A NaN compares false with everything, so every check is written as "is in range" (``not
low <= x``), never as "is out of range" (``x < low``), which a NaN would pass.
"""

from __future__ import annotations

import math

__all__ = ["check_numbers"]

# torch.manual_seed takes 64 bits; the evaluation generator adds an offset to the seed.
SEED_LIMIT = 2**63


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _real(config, name: str) -> float:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
    return float(value)


def _integer(config, name: str, low: int, high: int | None = None) -> int:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value \
            or (high is not None and not value < high):
        wanted = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{_flag(name)} must be an integer {wanted}, got {value!r}")
    return value


def check_numbers(config) -> None:
    """Raise ``ValueError`` naming the flag of the first number of ``config`` out of range."""
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches",
                 "log_every", "task_size", "keep", "context_parallel"):
        _integer(config, name, 1)
    if config.seq_len is not None:
        _integer(config, "seq_len", 1)
    _integer(config, "warmup", 0)
    _integer(config, "seed", 0, SEED_LIMIT)
    lr, min_lr = _real(config, "lr"), _real(config, "min_lr")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"need 0 <= --min-lr <= --lr, got --min-lr {min_lr} and --lr {lr}")
    if not _real(config, "weight_decay") >= 0:
        raise ValueError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not _real(config, "grad_clip") >= 0:
        raise ValueError(f"--grad-clip must be >= 0 (0: no clipping), got {config.grad_clip}")
    for name in ("beta1", "beta2"):
        if not 0 <= _real(config, name) < 1:
            raise ValueError(f"{_flag(name)} must be in [0, 1), got {getattr(config, name)}")
