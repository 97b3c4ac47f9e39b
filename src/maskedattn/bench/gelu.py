"""GELU on the CPU: the native kernel of :mod:`maskedattn.model.gelu` against torch's own.

For each dtype and form (exact erf, GPT-2's tanh) it times the forward (``F.gelu`` against
:func:`~maskedattn.model.gelu.native_forward`) and the backward (``aten.gelu_backward`` against
:func:`~maskedattn.model.gelu.native_backward`), the two alternately, after warm-up; the table
shows medians and the speed-up (torch's time / ours: above 1.0, ours is faster). Each row
compares the two kernels themselves, also where the operators hand a pass to torch's (the
passes where torch's is the faster).

    python benchmarks/gelu_cpu.py                          # the MLP of the training benchmark
    python benchmarks/gelu_cpu.py --rows 1024 --width 3072  # GPT-2 small's, 1024 tokens
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..model import gelu
from . import count


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int
               ) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(prog="maskedattn bench gelu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=count(), default=3072, help="tokens (batch x context)")
    p.add_argument("--width", type=count(), default=1536, help="the MLP's hidden width")
    p.add_argument("--repeats", type=count(), default=30)
    p.add_argument("--warmup", type=count(0), default=5)
    p.add_argument("--threads", type=count(), default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if gelu._library() is None:
        raise SystemExit(f"the native GELU kernel is not available: {gelu.native_status()}")
    print(f"GELU of ({args.rows}, {args.width}), {torch.get_num_threads()} threads, torch"
          f" {torch.__version__}, {platform.processor() or platform.machine()}; median ms of"
          f" {args.repeats}")
    print(f"{'dtype':<10}{'form':<6}{'pass':<10}{'torch':>9}{'ours':>9}{'speed-up':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.rows, args.width, dtype=dtype)
        grad = torch.randn_like(x)
        for form in ("none", "tanh"):
            passes = {
                "forward": {"torch": partial(F.gelu, x, approximate=form),
                            "ours": partial(gelu.native_forward, x, form)},
                "backward": {
                    "torch": partial(torch.ops.aten.gelu_backward, grad, x, approximate=form),
                    "ours": partial(gelu.native_backward, grad, x, form)},
            }
            for name, fns in passes.items():
                ms = _median_ms(fns, args.repeats, args.warmup)
                print(f"{str(dtype).removeprefix('torch.'):<10}{form:<6}{name:<10}"
                      f"{ms['torch']:>9.3f}{ms['ours']:>9.3f}{ms['torch'] / ms['ours']:>9.2f}x")
    return 0
