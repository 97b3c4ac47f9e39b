"""Ring attention on the CPU: peak memory per rank and time, 1, 2 and 4 gloo processes.

Each rank is a real process (torch.multiprocessing spawn, gloo over TCP on this machine). It
holds its zigzag shard of a causal sequence and runs one forward and backward of
:func:`ring_attention`; it reports its peak resident memory above what it held before the
tensors were made (the interpreter, torch and the process group), the wall time, the time it
spent waiting on messages after its compute was done (communication not hidden, plus waiting on
a slower peer), and what the same messages cost with no compute at all. The first row is plain
single-process :func:`attention` (no ring, no process group) on the whole sequence: the
memory a user saves is the ratio to it.

    python benchmarks/ring_cpu.py --seq-len 32768 --ranks 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maskedattn.attention import Causal, attention
from maskedattn.attention.ring import RingStats, ring_attention


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _comm_alone(k: torch.Tensor, v: torch.Tensor, rounds: int) -> float:
    """Seconds of one ring step's messages (k and v to the next rank) with nothing else to do."""
    rank, world = dist.get_rank(), dist.get_world_size()
    times = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        ops = [dist.P2POp(dist.isend, t, (rank + 1) % world) for t in (k, v)]
        ops += [dist.P2POp(dist.irecv, torch.empty_like(t), (rank - 1) % world) for t in (k, v)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _rank(rank: int, world: int, port: int, args, out_dir: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    base = _rss_mib()
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 1, args.heads, args.seq_len, args.head_dim
    # Each rank draws only its own shard: the whole sequence never exists on one rank.
    local = t // world
    q, k, v, do = (torch.randn(b, h, local, d, generator=g) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    stats = RingStats()
    dist.barrier()
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = u0.ru_utime + u0.ru_stime
    t0 = time.perf_counter()
    out = ring_attention(q, k, v, Causal(), stats=stats)
    t_fwd = time.perf_counter() - t0
    out.backward(do)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 1024
    cpu = usage.ru_utime + usage.ru_stime - cpu0  # what the machine's load cannot inflate
    comm = _comm_alone(k.detach(), v.detach(), 5) if world > 1 else 0.0
    # Messages per step: k and v (forward), k, v and their gradients (backward).
    block_bytes = 2 * k.numel() * k.element_size()
    expected = comm * stats.bytes_sent / block_bytes if world > 1 else 0.0
    record = {"rank": rank, "world": world, "seq_len": t, "base_mib": base, "peak_mib": peak,
              "activations_mib": peak - base, "forward_s": t_fwd, "wall_s": wall, "cpu_s": cpu,
              "compute_s": stats.compute_s, "wait_s": stats.wait_s,
              "bytes_sent": stats.bytes_sent, "comm_alone_s": expected,
              "pairs": stats.pairs_computed, "skipped": stats.pairs_skipped}
    with open(os.path.join(out_dir, f"{world}-{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def _single(_: int, args, out_dir: str) -> None:
    """One process, no ring: ``attention()`` forward + backward on the whole sequence."""
    torch.set_num_threads(args.threads)
    base = _rss_mib()
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, args.heads, args.seq_len, args.head_dim, generator=g)
                   for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    attention(q, k, v, Causal()).backward(do)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {"activations_mib": usage.ru_maxrss / 1024 - base, "wall_s": wall,
              "cpu_s": usage.ru_utime + usage.ru_stime - u0.ru_utime - u0.ru_stime}
    Path(out_dir, "single.json").write_text(json.dumps(record))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    # glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB) in the heap, so
    # peak RSS would measure its high-water mark, not live tensors: above 1 MiB, map and unmap.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    print(f"T={args.seq_len} B=1 H={args.heads} D={args.head_dim} float32, causal, zigzag;"
          f" {args.threads} thread(s) per rank;"
          f" MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_single, args=(args, tmp), nprocs=1, join=True)
        single = json.loads(Path(tmp, "single.json").read_text())
    print("ranks | activations MiB/rank (max) | vs attention() | vs first ring row | wall s |"
          " CPU s, all ranks | compute s/rank | waiting s/rank | comm alone s/rank | hidden |"
          " hidden, best rank")
    print(f"attention() | {single['activations_mib']:.0f} | 1.00 | - | {single['wall_s']:.1f} |"
          f" {single['cpu_s']:.1f} | - | - | - | - | -")
    first = None
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(world, _port(), args, tmp), nprocs=world, join=True)
            recs = [json.loads(Path(tmp, f"{world}-{r}.json").read_text())
                    for r in range(world)]
        act = max(r["activations_mib"] for r in recs)
        first = first or act
        wall = max(r["wall_s"] for r in recs)
        cpu = sum(r["cpu_s"] for r in recs)
        compute = sum(r["compute_s"] for r in recs) / world
        wait = sum(r["wait_s"] for r in recs) / world
        alone = sum(r["comm_alone_s"] for r in recs) / world
        hidden = f"{max(0.0, 1 - wait / alone):.0%}" if alone > 0 else "-"
        # A rank also waits for a peer whose compute ran late (time-shared cores): the rank that
        # waited least is the nearest to the link's own cost.
        best = min(r["wait_s"] / r["comm_alone_s"] for r in recs) if alone > 0 else None
        best = f"{max(0.0, 1 - best):.0%}" if best is not None else "-"
        print(f"{world} | {act:.0f} | {act / single['activations_mib']:.2f} | {act / first:.2f} |"
              f" {wall:.1f} | {cpu:.1f} | {compute:.1f} | {wait:.2f} | {alone:.2f} | {hidden} |"
              f" {best}")
        print("   ", json.dumps(recs))


if __name__ == "__main__":
    main()
