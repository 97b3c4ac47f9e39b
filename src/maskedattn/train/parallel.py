"""Parallelism applied to the model from outside: data, context (ring attention) and FSDP2.

The ranks of a ``torchrun`` job form a grid, world = dp x cp. The cp ranks of one data-parallel
slot (consecutive ranks) share the same rows of every batch and split each sequence between
them (zigzag layout, :mod:`maskedattn.attention.ring`); the dp slots take different rows::

    world 4, --context-parallel 2:   rank 0 1 | 2 3
                                     dp   0 0 | 1 1     rows of the batch
                                     cp   0 1 | 0 1     halves of each sequence

Gradients: every rank's loss is its share of the global batch's mean loss, so the average over
*all* ranks (DDP or FSDP2 over the whole world, times the world size in the loop) is the global
gradient, however the targets fall into ranks.

The model stays as it is. :class:`ContextParallel` runs its forward with the model's position
bookkeeping swapped for the duration of the call: each token's global position (for RoPE and
learned embeddings), the mask over the whole sequence, and how the layers attend, which
becomes :func:`ring_attention` over the cp group. Evaluation runs the same way
(:meth:`ContextParallel.whole_logits`), so its attention is the ring's too.

FSDP2 (``fully_shard``) shards parameters, gradients and AdamW's moments over the whole world.
Checkpoints stay one file set that ``GPT.from_pretrained`` reads: full tensors are gathered to
rank 0 with ``torch.distributed.checkpoint.state_dict`` at save time, and scattered back at
resume, on any number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import Causal, Documents
from ..attention.ring import gather, positions, ring_attention, shard
from ..model import GPT
from ..model.gpt import GPTOutput
from ..model.layers import Positions, rope_tables
from .distributed import Distributed

__all__ = ["ContextParallel", "Grid", "clip_grad_norm", "full_state", "no_sync", "wrap"]

_IGNORE = -100  # targets that score nothing (cross-entropy's ignore_index)


@dataclass(frozen=True)
class Grid:
    """This rank's place in the dp x cp grid, and the cp group of its ring."""

    dp: int
    cp: int
    dp_rank: int
    cp_rank: int
    cp_group: dist.ProcessGroup | None
    fsdp: bool = False

    @classmethod
    def of(cls, run: Distributed, context_parallel: int, fsdp: bool = False) -> Grid:
        """Split the world into dp x cp (cp consecutive ranks per data-parallel slot)."""
        if context_parallel < 1 or run.world % context_parallel:
            raise ValueError(f"--context-parallel {context_parallel} must divide the number of"
                             f" processes ({run.world})")
        cp = context_parallel
        group = None
        if cp > 1:
            # A group of its own even when cp == world: ring messages then never interleave
            # with the gradient collectives of the default group.
            for start in range(0, run.world, cp):  # every rank creates every group, in order
                g = dist.new_group(list(range(start, start + cp)))
                if start == run.rank - run.rank % cp:
                    group = g
        return cls(run.world // cp, cp, run.rank // cp, run.rank % cp, group, fsdp)

    def rows(self, global_batch: int) -> slice:
        """This data-parallel slot's rows of a global batch."""
        per = global_batch // self.dp
        return slice(self.dp_rank * per, (self.dp_rank + 1) * per)


class ContextParallel(nn.Module):
    """``model`` with each sequence split over the ranks of ``group`` (ring attention).

    Called as the model is, on the whole (B, T) batch of its data-parallel slot; it computes the
    logits of this rank's positions only, and a loss that is this rank's share of the batch's
    mean loss (the sum over the cp ranks is the mean).
    """

    def __init__(self, model: GPT, group: dist.ProcessGroup, layout: str = "zigzag") -> None:
        super().__init__()
        self.model, self.group, self.layout = model, group, layout
        self.ranks = dist.get_world_size(group)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, *,
                documents: Tensor | None = None) -> GPTOutput:
        # Sequences are padded at the end to a multiple of the chunks: causal attention never
        # lets a real token see the padding, and padded targets score nothing.
        chunks = 2 * self.ranks if self.layout == "zigzag" else self.ranks
        pad = -tokens.shape[1] % chunks
        t = tokens.shape[1] + pad
        if t > self.model.config.context:
            raise ValueError(f"with --context-parallel {self.ranks} sequences are padded to a"
                             f" multiple of {chunks}: {t} positions, more than the model's"
                             f" context of {self.model.config.context}")
        if pad:
            tokens = F.pad(tokens, (0, pad))
            targets = None if targets is None else F.pad(targets, (0, pad), value=_IGNORE)
            documents = None if documents is None else F.pad(documents, (0, pad), value=-1)
        local = shard(tokens, 1, group=self.group, layout=self.layout)
        index = positions(t, group=self.group, layout=self.layout, device=tokens.device)[None]
        mask = Causal() if documents is None else Causal() & Documents(documents)
        config = self.model.config
        rope = rope_tables(index, config.head_dim, config.rope_base) \
            if config.positions == "rope" else None
        pos = Positions(index, mask, local.shape[1], rope, functools.partial(
            ring_attention, mask=mask, group=self.group, layout=self.layout,
            backend=config.attn_backend))
        with _positioned(self.model, pos):
            logits = self.model(local).logits
        if targets is None:
            return GPTOutput(logits, None)
        mine = shard(targets, 1, group=self.group, layout=self.layout)
        scored = max(1, int((targets != _IGNORE).sum()))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), mine.flatten(),
                               ignore_index=_IGNORE, reduction="sum") / scored
        return GPTOutput(logits, loss)

    @torch.no_grad()
    def whole_logits(self, tokens: Tensor, *, documents: Tensor | None = None) -> Tensor:
        """The logits of every position, (B, T, V), for evaluation: each rank computes its
        part through the ring, then the cp ranks gather the parts (every rank gets all)."""
        local = self(tokens, documents=documents).logits
        return gather(local, 1, group=self.group, layout=self.layout, seq_len=tokens.shape[1])


@contextlib.contextmanager
def _positioned(model: GPT, pos: Positions):
    """Inside: the model's positions are ``pos``, whose layers attend through the ring."""
    model._positions = lambda *args, **kwargs: pos  # an instance attribute hides the method
    try:
        yield
    finally:
        del model._positions


def wrap(model: GPT, optimizer: torch.optim.Optimizer, grid: Grid, world: int,
         make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The module the loop calls (FSDP2 or DDP over the world, context parallelism inside),
    and the optimizer to step.

    Under FSDP2 the parameters become shards, so the optimizer is made anew over them by
    ``make_optimizer(model)``, and any state ``optimizer`` holds (a resumed run's) is moved
    into it, each rank keeping its shard.
    """
    inner: nn.Module = model
    if grid.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.fsdp import fully_shard

        # Keyed by parameter names. Asked only of a resumed optimizer: on a fresh one the call
        # would initialise the state (a step of zero gradients, step counts 1).
        state = get_optimizer_state_dict(model, optimizer) if optimizer.state else None
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        optimizer = make_optimizer(model)
        if state is not None:
            set_optimizer_state_dict(model, optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
    if grid.cp > 1:
        inner = ContextParallel(model, grid.cp_group)
    if grid.fsdp or world == 1:
        return inner, optimizer
    return nn.parallel.DistributedDataParallel(inner), optimizer


def no_sync(wrapped: nn.Module, last: bool):
    """Context for one micro-batch: gradients cross ranks only on the ``last`` one."""
    if last or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
        # FSDP2 reduces every micro-batch (its gradients are sharded; nothing to skip).
        return contextlib.nullcontext()
    return wrapped.no_sync()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over every shard); return it before clipping."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def full_state(model: GPT, optimizer: torch.optim.Optimizer, grid: Grid, is_main: bool,
               make_optimizer):
    """(model, optimizer) with full tensors for rank 0 to save; every rank must call.

    Without FSDP these are the objects themselves. Under FSDP2 the full state dicts are
    gathered with ``torch.distributed.checkpoint.state_dict`` and loaded into a plain model
    and optimizer on rank 0 (None elsewhere), so the checkpoint has the one-process format.
    """
    if not grid.fsdp:
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, optimizer, options=options)
    if not is_main:
        return None, None
    plain = GPT(model.config)
    plain.load_state_dict(weights)
    plain_opt = make_optimizer(plain)
    set_optimizer_state_dict(plain, plain_opt, moments)
    return plain, plain_opt
