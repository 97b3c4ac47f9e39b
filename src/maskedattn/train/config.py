"""``TrainConfig``: every choice of a training run, one field per command-line flag."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .checks import check_numbers

__all__ = ["TrainConfig"]


def _opt(default, help: str):
    """A field whose ``help`` becomes the text of its command-line flag."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Model shape comes from ``preset`` plus the overrides in ``model``."""

    out: str = _opt("run", "output directory: checkpoints, metrics.jsonl, loss.png")
    data: str | None = _opt(None, "a prepared corpus directory (from `maskedattn prepare`)")
    task: str | None = _opt(None, "train on a synthetic task instead: induction, copying, recall")
    task_size: int = _opt(16, "the task's sequence length (pairs, for recall)")
    preset: str = _opt("tiny", "model preset (GPTConfig.preset); model flags override it")
    model: tuple[tuple[str, object], ...] = _opt((), "GPTConfig fields overriding the preset")
    steps: int = _opt(1000, "optimizer steps in total")
    batch_size: int = _opt(16, "sequences per optimizer step, across all processes")
    seq_len: int | None = _opt(None, "tokens per sequence (default: the model's context)")
    grad_accum: int = _opt(1, "micro-batches per step (the batch is split across them)")
    lr: float = _opt(1e-3, "peak learning rate")
    min_lr: float = _opt(1e-4, "learning rate at the end of the cosine decay")
    warmup: int = _opt(100, "steps of linear warmup")
    weight_decay: float = _opt(0.1, "AdamW weight decay (linear weights only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    dtype: str = _opt("float32", "float32, or bfloat16 autocast")
    packed: bool = _opt(False, "hide other documents from each token (Documents mask)")
    eval_every: int = _opt(100, "steps between evaluations and checkpoints")
    eval_batches: int = _opt(8, "batches per evaluation")
    keep: int = _opt(3, "checkpoints to keep")
    seed: int = _opt(0, "seed of the initialisation and of the batches")
    log_every: int = _opt(10, "steps between lines of metrics.jsonl")
    track_heads: bool = _opt(False, "at each evaluation, record every head's role scores"
                             " (induction, previous-token, ...) on a fixed probe into"
                             " metrics.jsonl, and draw them in heads.png")
    tensorboard: bool = _opt(False, "also write TensorBoard logs to OUT/tensorboard (needs the"
                             " tensorboard package)")
    context_parallel: int = _opt(1, "split each sequence over this many processes (ring"
                                 " attention); the world is data x context parallel")
    fsdp: bool = _opt(False, "shard parameters, gradients and optimizer state (FSDP2)")

    def __post_init__(self) -> None:
        if (self.data is None) == (self.task is None):
            raise ValueError("give exactly one of --data (a prepared corpus) or --task")
        check_numbers(self)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum"
                             f" {self.grad_accum}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")

    def to_json(self) -> dict:
        """A JSON-ready dict (``model`` overrides as an object)."""
        d = asdict(self)
        d["model"] = dict(self.model)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        """The inverse of :meth:`to_json`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        d = dict(d)
        d["model"] = tuple(sorted((d.get("model") or {}).items()))
        return cls(**d)
