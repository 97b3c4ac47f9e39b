"""Data parallelism across processes started by ``torchrun`` (gloo on CPU, NCCL on CUDA).

The model code knows nothing of this: the loop wraps the model in DistributedDataParallel and
gives each rank its own slice of every global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Distributed", "setup_distributed"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank, world size, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and pictures."""
        return self.rank == 0

    def sum(self, value: float) -> float:
        """The sum of ``value`` over all ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def close(self) -> None:
        """Leave the process group (a no-op for a single process)."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed() -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if world == 1:
        return Distributed(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return Distributed(rank, world, device)
