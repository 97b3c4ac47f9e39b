"""Run a function in real ``torch.distributed`` gloo processes, bounded in time."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, rendezvous: str, fn, args) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():  # fn may have left the group itself
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes; fail on error or timeout.

    The ranks meet in a file store: a TCP port picked free beforehand can be taken by a test
    running beside this one before rank 0 binds it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = str(Path(tmp) / "rendezvous")
        ctx = mp.spawn(_entry, args=(world, rendezvous, fn, args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s")
