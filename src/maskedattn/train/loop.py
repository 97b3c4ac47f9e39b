"""The training loop: batches in, AdamW steps out, with evaluation, logs and checkpoints.

One process or many (``torchrun``): each rank takes its slice of every global batch, gradients
are averaged by DistributedDataParallel, and only rank 0 writes anything. A run can be killed at
any moment and continued with ``resume``: the model, the optimizer, the learning-rate schedule
and the random generators come back exactly, so the resumed run computes the same losses.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..data.shards import TokenShards, read_manifest
from ..data.tasks import IGNORE, make_task
from ..data.tokenizer import load as load_tokenizer
from ..model import GPT, GPTConfig
from ..model.gpt import GPTOutput
from . import checkpoint as ckpt
from . import parallel
from .config import TrainConfig
from .distributed import Distributed, setup_distributed
from .evaluation import evaluate_batch
from .health import check_step, check_weights
from .memory import check_fits
from .optim import learning_rate, make_optimizer
from .report import MetricsLog
from .watch import Watch, progress_mode

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What a finished run leaves: the model, its last checkpoint and the metrics."""

    model: GPT
    checkpoint: Path | None
    metrics: list[dict]


@dataclass
class _Batch:
    tokens: Tensor
    targets: Tensor
    documents: Tensor | None = None
    scored: int = 0  # scored targets in the whole global batch (all ranks)


class _Source:
    """Where batches come from: a prepared corpus or a synthetic task."""

    def __init__(self, config: TrainConfig, model_config: GPTConfig, tokenizer_dir: Path | None):
        self.task = None
        self.val = None
        if config.task is not None:
            self.task = make_task(config.task, model_config.vocab_size, config.task_size)
            self.seq_len = self.task.seq_len
        else:
            self.train = TokenShards(config.data, "train")
            self.val = TokenShards(config.data, "val")
            self.seq_len = config.seq_len or model_config.context
        if self.seq_len > model_config.context:
            raise ValueError(f"sequences of {self.seq_len} tokens exceed the model's context of"
                             f" {model_config.context}; use --seq-len or a larger --context")
        self.packed = config.packed
        # Saved into every checkpoint, so that `generate` reads the model's own tokens.
        self.tokenizer = None
        if tokenizer_dir is not None:
            with contextlib.suppress(FileNotFoundError):  # task runs have no tokenizer
                self.tokenizer = load_tokenizer(tokenizer_dir)

    def sample(self, batch: int, generator: torch.Generator, rows: slice) -> _Batch:
        if self.task is not None:
            b = self.task.sample(batch, generator)
            scored = int((b.targets != IGNORE).sum())
            return _Batch(b.tokens[rows], b.targets[rows], scored=scored)
        b = self.train.sample(batch, self.seq_len, generator, rows)
        return _Batch(b.tokens, b.targets, b.documents if self.packed else None,
                      scored=batch * self.seq_len)

    def eval_batches(self, batch: int, count: int, seed: int) -> Iterator[_Batch]:
        # The same batches at every evaluation, so that the numbers are comparable.
        g = torch.Generator().manual_seed(seed + 1_000_003)
        for _ in range(count):
            if self.task is not None:
                b = self.task.sample(batch, g)
                yield _Batch(b.tokens, b.targets)
            else:
                b = self.val.sample(batch, self.seq_len, g)
                yield _Batch(b.tokens, b.targets, b.documents if self.packed else None)


def _model_config(config: TrainConfig, data_vocab: int | None) -> GPTConfig:
    overrides = dict(config.model)
    if data_vocab is not None:
        overrides.setdefault("vocab_size", data_vocab)
    return GPTConfig.preset(config.preset, **overrides)


def _data_vocab(config: TrainConfig) -> int | None:
    if config.data is None:
        return None
    return int(read_manifest(Path(config.data))["vocab_size"])


def _autocast(config: TrainConfig, device: torch.device):
    if config.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward(model: nn.Module, batch: _Batch, device: torch.device):
    return model(batch.tokens.to(device), batch.targets.to(device),
                 **({"documents": batch.documents.to(device)}
                    if batch.documents is not None else {}))


@torch.no_grad()
def evaluate(model: GPT, source: _Source, config: TrainConfig, device: torch.device,
             context_parallel: parallel.ContextParallel | None = None) -> dict:
    """Validation loss and perplexity (corpus) or loss and accuracy (task).

    With ``context_parallel`` each sequence is split over its ranks as in training (ring
    attention), and every rank gets the numbers of the whole batch.
    """
    model.eval()
    losses, accs = [], []
    # Whole batches of --batch-size sequences, run in micro-batches: the same numbers whatever
    # --grad-accum is (see evaluation.py).
    def forward(part: tuple):
        with _autocast(config, device):
            if context_parallel is None:
                return _forward(model, _Batch(*part), device)
            tokens, _, documents = part
            return GPTOutput(context_parallel.whole_logits(
                tokens.to(device), documents=None if documents is None else documents.to(device)
            ), None)

    for batch in source.eval_batches(config.batch_size, config.eval_batches, config.seed):
        loss, acc = evaluate_batch(forward, batch.tokens, batch.targets, batch.documents,
                                   config.batch_size // config.grad_accum,
                                   with_accuracy=source.task is not None)
        losses.append(loss)
        if acc is not None:
            accs.append(acc)
    model.train()
    loss = sum(losses) / len(losses)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
    if accs:
        result["accuracy"] = sum(accs) / len(accs)
    return result


def train(config: TrainConfig | None, *, resume: str | Path | None = None,
          progress: bool | str = True, tokenizer_dir: str | Path | None = None,
          on_eval: Callable[[int, dict], None] | None = None,
          layout: dict | None = None) -> TrainResult:
    """Train a GPT as ``config`` says, or continue the run at ``resume``.

    ``resume`` is a run directory (its newest checkpoint is used) or a checkpoint directory;
    the run then keeps the settings stored with it (``config`` must be None) and goes on
    writing into the directory that holds the checkpoint.

    ``progress``: True or "bar" for a progress bar, "lines" for one plain line per log
    interval and per evaluation (:mod:`.watch`), False or "off" for silence.

    ``tokenizer_dir`` holds the tokenizer saved into every checkpoint (for a corpus, the one
    ``maskedattn prepare`` wrote there, used by default).

    ``layout`` (with ``resume``): ``context_parallel`` and ``fsdp`` for this launch, which may
    differ from the saved run's, as may the number of processes.
    """
    dist = setup_distributed()
    try:
        return _train(config, dist, resume, progress, tokenizer_dir, on_eval, layout)
    finally:
        dist.close()


def _train(config: TrainConfig, dist: Distributed, resume, progress, tokenizer_dir,
           on_eval, layout=None) -> TrainResult:
    state: dict = {}
    if (config is None) == (resume is None):
        raise ValueError("give either a TrainConfig for a new run or resume=DIR, not both")
    if resume is not None:
        start_dir = ckpt.find_latest(Path(resume))
        state = ckpt.read_json(start_dir / ckpt.TRAINER_STATE)
        saved = TrainConfig.from_json(state.get("train_config", {}))
        config = replace(saved, out=str(start_dir.parent), **(layout or {}))
    out = Path(config.out)
    grid = parallel.Grid.of(dist, config.context_parallel, config.fsdp)
    if config.batch_size % (grid.dp * config.grad_accum):
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the number of"
                         f" data-parallel processes ({grid.dp}) times --grad-accum"
                         f" ({config.grad_accum})")
    if tokenizer_dir is None:
        tokenizer_dir = start_dir if resume is not None else config.data
    torch.manual_seed(config.seed)
    if resume is not None:
        model = GPT.from_pretrained(start_dir, dtype=torch.float32, device=dist.device)
    else:
        model = GPT(_model_config(config, _data_vocab(config))).to(dist.device)
    source = _Source(config, model.config, Path(tokenizer_dir) if tokenizer_dir else None)
    check_fits(model.config, config.batch_size // config.grad_accum // dist.world,
               source.seq_len, dist.device)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2))
    data_gen = torch.Generator().manual_seed(config.seed)
    step = 0
    if resume is not None:
        ckpt.load_optimizer(optimizer, model, start_dir / "optimizer.safetensors",
                            state.get("optimizer", {}))
        rng = ckpt.load_tensors(start_dir / "rng.safetensors")
        data_gen.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])
        step = int(state["step"])
    remake = functools.partial(make_optimizer, lr=config.lr, weight_decay=config.weight_decay,
                               betas=(config.beta1, config.beta2))
    wrapped, optimizer = parallel.wrap(model, optimizer, grid, dist.world, remake)
    eval_cp = parallel.ContextParallel(model, grid.cp_group) if grid.cp > 1 else None

    log = MetricsLog(out / "metrics.jsonl", resume_step=step if resume is not None else None) \
        if dist.is_main else None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    bar = _progress_bar(progress_mode(progress) == "bar" and dist.is_main, config.steps, step)
    watch = Watch(config, out, model=model, source=source, progress=progress,
                  main=dist.is_main, step=step, records=log.read() if log else [], bar=bar)
    tokens_per_step = config.batch_size * source.seq_len
    micro = config.batch_size // config.grad_accum
    last_ckpt = None
    t_last, tokens_since = time.perf_counter(), 0
    while step < config.steps:
        lr = learning_rate(step, lr=config.lr, min_lr=config.min_lr, warmup=config.warmup,
                           total=config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = source.sample(config.batch_size, data_gen, grid.rows(config.batch_size))
        loss_sum = 0.0
        per_rank = micro // grid.dp
        for i in range(config.grad_accum):
            part = _Batch(*(None if t is None else t[i * per_rank:(i + 1) * per_rank]
                            for t in (batch.tokens, batch.targets, batch.documents)))
            # The step's loss is the mean over every scored target of the global batch, however
            # the targets fall into micro-batches and ranks: each part weighs by its share.
            # (DDP averages gradients over ranks, hence the factor world.)
            share = int((part.targets != IGNORE).sum()) / batch.scored
            # gradients cross ranks on the last micro-batch only
            last = i == config.grad_accum - 1
            with parallel.no_sync(wrapped, last), _autocast(config, dist.device):
                loss = _forward(wrapped, part, dist.device).loss * share  # NaN: see below
            with parallel.no_sync(wrapped, last):  # a context manager enters once
                (loss * dist.world).backward()
            loss_sum += loss.item()
        norm = parallel.clip_grad_norm(model, config.grad_clip)
        loss_value = dist.sum(loss_sum)
        check_step(step + 1, loss_value, float(norm), lr, last_ckpt)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += tokens_per_step
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if dist.is_main and (step % config.log_every == 0 or step == config.steps):
            now = time.perf_counter()
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(norm),
                      "tokens_per_s": tokens_since / max(now - t_last, 1e-9)}
            t_last, tokens_since = now, 0
            watch.on_log(record)  # adds tokens seen and elapsed time; prints, TensorBoard
            log.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
        if step % config.eval_every == 0 or step == config.steps:
            check_weights(model, step)  # on every rank, before anything is written
            metrics = evaluate(model, source, config, dist.device, eval_cp)
            metrics.update(watch.measure(model, step, metrics))  # bits, time; --track-heads
            saved = parallel.full_state(model, optimizer, grid, dist.is_main, remake)
            if dist.is_main:
                log.write({"step": step, **metrics})
                last_ckpt = _save(out, step, *saved, data_gen, config, source, log.read())
                watch.on_eval(step, metrics, log.read())  # a line, loss.png, TensorBoard
                if on_eval is not None:
                    on_eval(step, metrics)
            t_last = time.perf_counter()
    if bar is not None:
        bar.close()
    metrics = log.read() if log is not None else []
    if dist.is_main:
        watch.close(metrics)
    return TrainResult(model, last_ckpt, metrics)


def _save(out: Path, step: int, model: GPT, optimizer, data_gen: torch.Generator,
          config: TrainConfig, source: _Source, metrics: list[dict]) -> Path:
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        meta = ckpt.save_optimizer(optimizer, model, tmp / "optimizer.safetensors")
        save_file({"data": data_gen.get_state(), "torch": torch.get_rng_state()},
                  tmp / "rng.safetensors")
        if source.tokenizer is not None:
            source.tokenizer.save(tmp)
        state = {"step": step, "train_config": config.to_json(), "optimizer": meta,
                 "last_metrics": metrics[-2:]}
        (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(state, indent=1))

    path = ckpt.write_atomically(out, f"step-{step:06d}", fill)
    ckpt.remove_old(out, config.keep)
    return path


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)
