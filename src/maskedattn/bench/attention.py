"""Attention on the CPU: the tiled backend against PyTorch's SDPA and the naive form.

``maskedattn bench attention`` (or ``python benchmarks/attention_cpu.py``). Every backend is
timed in the same run, interleaved repetition by repetition so that a busy machine slows all of
them alike; the table shows medians after a warm-up, the ratio tiled / SDPA (below 1 is faster),
and the achieved GFLOP/s next to the machine's own matrix-product GFLOP/s, the ceiling. Float32
rows also show the kernel's GFLOP/s as a share of the CPU's float32 FMA peak, measured by a loop
of register-resident multiply-adds (``csrc/fma_peak.c``, built for the kernel's instruction set)
timed interleaved with the row's backends, so that the load of a shared machine hits both.

FLOPs: 4 B H Tq Tk D for the forward (two products), halved under a causal mask; the backward
does 2.5 times the forward's (five products), so forward + backward counts 3.5 times.

Sections: the main sweep (causal, float32 and bfloat16, D = 64 and 128, forward and
forward + backward); a sliding window (w = 256) at T = 4096 and 8192, where the tiled cost
should grow linearly and SDPA's dense mask quadratically; decoding (one query against a long
cache); small calls, where what the operator layer costs shows; peak memory of forward +
backward at T = 16384.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import maskedattn as ma
from maskedattn._cbuild import load
from maskedattn._optional import require
from maskedattn.attention import Causal, Mask, SlidingWindow, lower_call, native, ops
from maskedattn.attention.lowering import op_args
from maskedattn.bench import count

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """The materialising form: the whole T x T score matrix, then softmax, then P V."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        t = s.shape[-1]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, dim=-1) @ v


def _step(fn: Callable[[], Tensor], grad: Tensor | None) -> Callable[[], None]:
    """One timed step: the forward, or the forward and its backward."""
    if grad is None:
        def forward() -> None:
            with torch.no_grad():
                fn()
        return forward

    def forward_backward() -> None:
        fn().backward(grad)
    return forward_backward


def time_interleaved(steps: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    """Median seconds of each step over ``repeat`` rounds after one warm-up round; within a
    round every step runs once, so noise from other work on the machine hits all of them."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeat + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    """The machine's own matrix-product speed, the ceiling for attention's products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = time_interleaved({"mm": lambda: a @ b}, repeat)["mm"]
    return 2 * n**3 / seconds / 1e9


class FmaPeak:
    """The float32 FMA peak of this CPU on ``threads`` threads, for the kernel's vectors."""

    SOURCE = Path(__file__).with_name("csrc") / "fma_peak.c"

    def __init__(self, kernel: native.Kernel, seconds: float = 0.05) -> None:
        flags = ["-O2", "-fopenmp", "-shared", "-fPIC", *kernel.variant.cc_flags]
        self._run = load(self.SOURCE, flags, f"fma_peak_{kernel.variant.name}",
                         {"fma_peak_run": ([ctypes.c_int64, ctypes.c_int], ctypes.c_double)}
                         ).fma_peak_run
        # rounds per timed step: about `seconds` long (the first call also wakes the threads)
        self._run(10_000, torch.get_num_threads())
        start = time.perf_counter()
        self._run(1_000_000, torch.get_num_threads())
        self.iters = max(1, int(1_000_000 * seconds / (time.perf_counter() - start)))
        self.flops = 0.0

    def step(self) -> None:
        """One timed run of the loop (ctypes releases the GIL; OpenMP runs the threads)."""
        self.flops = self._run(self.iters, torch.get_num_threads())


def attention_flops(b: int, h: int, tq: int, tk: int, d: int, causal: bool, backward: bool):
    flops = 4 * b * h * tq * tk * d / (2 if causal else 1)
    return flops * (3.5 if backward else 1.0)


def _inputs(b: int, h: int, t: int, d: int, dtype: torch.dtype, tq: int | None = None):
    q = torch.randn(b, h, tq or t, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, t, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, t, d, dtype=dtype, requires_grad=True)
    return q, k, v


def _backends(q, k, v, mask: Mask | None, naive: bool) -> dict[str, Callable[[], Tensor]]:
    fns = {
        "tiled": lambda: ma.attention(q, k, v, mask, backend="tiled"),
        "sdpa": lambda: ma.attention(q, k, v, mask, backend="sdpa"),
    }
    if naive:
        fns["naive"] = lambda: naive_attention(q, k, v, causal=mask is not None)
    return fns


def sweep(args, peak: FmaPeak | None) -> list[dict]:
    """The main table: causal attention over T, D, dtypes, forward and forward + backward;
    with ``peak``, float32 rows show tiled's GFLOP/s as a share of the FMA peak."""
    rows = []
    print(f"{'dtype':>8} {'pass':>7} {'D':>4} {'T':>6} | {'tiled ms':>9} {'GF/s':>5}"
          f" {'%peak':>5} | {'sdpa ms':>9} {'GF/s':>5} | {'naive ms':>9} | {'tiled/sdpa':>10}")
    for dtype_name in args.dtypes:
        for backward in [p == "fwdbwd" for p in args.passes]:
            for d in args.d:
                for t in args.t:
                    q, k, v = _inputs(args.batch, args.heads, t, d, DTYPES[dtype_name])
                    grad = torch.randn_like(q) if backward else None
                    fns = _backends(q, k, v, Causal(), naive=t <= args.naive_max_t)
                    steps = {n: _step(f, grad) for n, f in fns.items()}
                    with_peak = peak is not None and dtype_name == "float32"
                    if with_peak:
                        steps["peak"] = peak.step
                    med = time_interleaved(steps, args.repeat)
                    flops = attention_flops(args.batch, args.heads, t, t, d, True, backward)
                    row = {"dtype": dtype_name, "pass": "fwd+bwd" if backward else "fwd", "d": d,
                           "t": t, **{f"{n}_s": s for n, s in med.items() if n != "peak"}}
                    share = "-"
                    if with_peak:
                        row["peak_gflops"] = peak.flops / med["peak"] / 1e9
                        share = f"{100 * flops / med['tiled'] / 1e9 / row['peak_gflops']:.0f}"
                    rows.append(row)
                    naive_ms = f"{med['naive'] * 1e3:9.1f}" if "naive" in med else f"{'-':>9}"
                    print(f"{dtype_name:>8} {row['pass']:>7} {d:>4} {t:>6} |"
                          f" {med['tiled'] * 1e3:9.1f} {flops / med['tiled'] / 1e9:5.0f}"
                          f" {share:>5} |"
                          f" {med['sdpa'] * 1e3:9.1f} {flops / med['sdpa'] / 1e9:5.0f} |"
                          f" {naive_ms} | {med['tiled'] / med['sdpa']:10.2f}", flush=True)
    return rows


def window_growth(args) -> None:
    """Sliding window: the tiled cost is linear in T (empty tiles skipped), SDPA's dense mask
    makes it quadratic."""
    print(f"\nsliding window w={args.window}, forward, float32 and bfloat16, D=64:")
    for dtype_name in args.dtypes:
        med = {}
        for t in (args.window_t, 2 * args.window_t):
            q, k, v = _inputs(args.batch, args.heads, t, 64, DTYPES[dtype_name])
            fns = _backends(q, k, v, SlidingWindow(args.window), naive=False)
            med[t] = time_interleaved({n: _step(f, None) for n, f in fns.items()}, args.repeat)
        t0, t1 = args.window_t, 2 * args.window_t
        for name in ("tiled", "sdpa"):
            growth = med[t1][name] / med[t0][name]
            print(f"{dtype_name:>8} {name:>5}: T={t0} {med[t0][name] * 1e3:8.1f} ms,"
                  f" T={t1} {med[t1][name] * 1e3:8.1f} ms, growth {growth:.2f}x")


def decoding(args) -> None:
    """One new query against a long key/value cache, forward only (generation)."""
    print("\ndecoding: Tq=1, forward, D=64:")
    for dtype_name in args.dtypes:
        for tk in (1024, 8192):
            q, k, v = _inputs(args.batch, args.heads, tk, 64, DTYPES[dtype_name], tq=1)
            fns = _backends(q, k, v, Causal(), naive=False)
            med = time_interleaved({n: _step(f, None) for n, f in fns.items()}, 20)
            print(f"{dtype_name:>8} Tk={tk:>5}: tiled {med['tiled'] * 1e6:7.0f} us,"
                  f" sdpa {med['sdpa'] * 1e6:7.0f} us, tiled/sdpa {med['tiled'] / med['sdpa']:.2f}")


def overhead() -> None:
    """What the operator layer costs on a call too small for the kernel's work to matter
    (B 1, H 2, T 4, D 16, causal): each way in, against the kernel's implementation alone."""
    q, k, v = _inputs(1, 2, 4, 16, torch.float32)
    plain = [t.detach() for t in (q, k, v)]
    flat = op_args(lower_call(*plain, Causal()))
    fwd = ops.FORWARD_OPS["tiled"]

    def best_us(fn: Callable[[], object], n: int = 2000) -> float:
        for _ in range(n // 10):
            fn()
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            rounds.append((time.perf_counter() - start) / n)
        return min(rounds) * 1e6

    impl = best_us(lambda: ops._tiled_forward(*plain, *flat))  # what the operator runs
    rows = {
        "operator, no gradient": best_us(lambda: fwd(*plain, *flat)),
        "operator, inputs requiring grad": best_us(lambda: fwd(q, k, v, *flat)),
        "ma.attention, inputs requiring grad": best_us(lambda: ma.attention(q, k, v, Causal())),
    }
    print(f"\nsmall calls: the operator layer, float32, best of 5 x 2000 calls; the kernel's"
          f" implementation alone {impl:.1f} us")
    for name, us in rows.items():
        print(f"{name:>36}: {us:6.1f} us, {us - impl:+6.1f} us over the implementation")
    both = {"ma.attention": lambda: ma.attention(q, k, v, Causal()).sum().backward(),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()
            .backward()}
    print("  forward + backward: " + ", ".join(f"{n} {best_us(f, 500):.1f} us"
                                                 for n, f in both.items()))
    # A decoding step's call: one query against a cache, no gradient, as GPT-2 makes 12 a token.
    q1, k1, v1 = (t.detach() for t in _inputs(1, 12, 64, 64, torch.float32, tq=1))
    with torch.no_grad():
        decode = {"ma.attention": lambda: ma.attention(q1, k1, v1),
                  "sdpa": lambda: F.scaled_dot_product_attention(q1, k1, v1)}
        print("  a decoding call (H 12, 1 query, 64 keys, D 64, no gradient): "
              + ", ".join(f"{n} {best_us(f):.1f} us" for n, f in decode.items()))


def peak_memory(args) -> None:
    """Peak resident memory of forward + backward above the inputs, from Linux's VmHWM."""
    t = args.memory_t
    q, k, v = _inputs(args.batch, args.heads, t, 64, torch.float32)
    grad = torch.randn_like(q)
    naive_gib = args.batch * args.heads * t * t * 4 / 2**30
    print(f"\npeak memory, float32 forward+backward, B={args.batch} H={args.heads} T={t} D=64"
          f" (one naive score matrix: {naive_gib:.1f} GiB):")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak := current resident size
    except OSError:
        print("  needs Linux's /proc/self/clear_refs; skipped")
        return

    def peak() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) * 1024

    before = peak()
    _step(lambda: ma.attention(q, k, v, Causal(), backend="tiled"), grad)()
    grown = (peak() - before) / 2**30
    inputs = 4 * q.numel() * 4 / 2**30
    print(f"  tiled: peak grew {grown:.2f} GiB above the inputs ({inputs:.2f} GiB: q, k, v, dO)")


def tune(args) -> None:
    """Native kernel time for several tile sizes (FORWARD_BLOCKS / BACKWARD_BLOCKS)."""
    print(f"\ntile sizes (block_q, block_k), causal, D=64, T={args.t[-1]}, ms:")
    for dtype_name in args.dtypes:
        _tune_dtype(args, dtype_name)


def _tune_dtype(args, dtype_name: str) -> None:
    from maskedattn.attention import tiled
    from maskedattn.attention.lowering import lower_call

    kernel = native.kernel()
    q, k, v = (x.detach() for x in _inputs(args.batch, args.heads, args.t[-1], 64,
                                           DTYPES[dtype_name]))
    call = lower_call(q, k, v, Causal())
    out, lse = tiled.forward_native(kernel, q, k, v, call)
    grad = torch.randn_like(q)
    blocks = [(bq, bk) for bq in (32, 64, 128, 256) for bk in (64, 128, 256)]
    fwd = time_interleaved({b: lambda b=b: tiled.forward_native(kernel, q, k, v, call, b)
                            for b in blocks}, args.repeat)
    bwd = time_interleaved({b: lambda b=b: tiled.backward_native(
        kernel, q, k, v, out, lse, grad, None, call, b) for b in blocks}, args.repeat)
    for b in blocks:
        print(f"{dtype_name:>8} {b!s:>10}: forward {fwd[b] * 1e3:7.1f}  backward"
              f" {bwd[b] * 1e3:7.1f}")


def plot(rows: list[dict], path: Path) -> None:
    """Time against T per backend, one panel per (dtype, pass, D)."""
    plt = require("matplotlib.pyplot", "the benchmark's plot")
    panels = sorted({(r["dtype"], r["pass"], r["d"]) for r in rows})
    cols = 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, squeeze=False,
                             figsize=(6 * cols, 3.5 * math.ceil(len(panels) / cols)))
    for ax, (dtype, pass_, d) in zip(axes.flat, panels, strict=False):
        sel = [r for r in rows if (r["dtype"], r["pass"], r["d"]) == (dtype, pass_, d)]
        for name in ("tiled", "sdpa", "naive"):
            pts = [(r["t"], r[f"{name}_s"] * 1e3) for r in sel if f"{name}_s" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(yscale="log", xlabel="T", ylabel="ms", title=f"{dtype} {pass_} causal, D={d}")
        ax.set_xscale("log", base=2)
        ts = sorted({r["t"] for r in sel})
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.minorticks_off()
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"\nplot: {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="maskedattn bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=count(), nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--d", type=count(), nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--batch", type=count(), default=1)
    p.add_argument("--heads", type=count(), default=8)
    p.add_argument("--repeat", type=count(), default=5, help="timed rounds (median), after warm-up")
    p.add_argument("--naive-max-t", type=count(0), default=4096,
                   help="longest T for the naive form (its T x T matrices fill memory)")
    p.add_argument("--window", type=count(), default=256, help="sliding window width")
    p.add_argument("--window-t", type=count(0), default=4096,
                   help="window section: T and 2T; 0 skips")
    p.add_argument("--memory-t", type=count(0), default=16384, help="memory section's T; 0 skips")
    p.add_argument("--no-decoding", action="store_true", help="skip the decoding section")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the small-call section (what the operator layer costs)")
    p.add_argument("--tune", action="store_true", help="also time the kernel's tile sizes")
    p.add_argument("--plot", type=Path, default=Path("bench-out/attention_cpu.png"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: small sizes, one round, no extra sections")
    args = p.parse_args(argv)
    if args.quick:
        args.t, args.d, args.repeat = [128, 256], [64], 1
        args.window_t = args.memory_t = 0
        args.no_decoding = args.no_overhead = args.no_plot = True
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables (and write the plot)."""
    args = parse_args(argv)
    kernel = native.kernel()
    if kernel is None and native.requested_variant() is not None:
        print("maskedattn bench attention: the native kernel cannot be built here, so tiled"
              " leaves these calls to SDPA; set MASKEDATTN_NATIVE=0 to time its pure-torch"
              " path instead", file=sys.stderr)
        return 2
    print(f"maskedattn bench attention, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"machine: {platform.processor() or platform.machine()}, {_cpu_name()},"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads,"
          f" native kernel: {kernel.variant.name if kernel else 'none (pure-torch twin)'}")
    print("ceiling (2048^3 matrix product): " + ", ".join(
        f"{n} {matmul_gflops(DTYPES[n]):.0f} GFLOP/s" for n in args.dtypes))
    peak = FmaPeak(kernel) if kernel is not None else None
    print(f"B={args.batch} H={args.heads}, causal; medians of {args.repeat} interleaved rounds"
          " after warm-up; %peak: tiled's share of the float32 FMA peak timed in the same rounds"
          "\n")
    rows = sweep(args, peak)
    if peak is not None:
        measured = [r["peak_gflops"] for r in rows if "peak_gflops" in r]
        if measured:
            print(f"FMA peak, float32 ({kernel.variant.name} vectors,"
                  f" {torch.get_num_threads()} threads): median {statistics.median(measured):.0f}"
                  f" GFLOP/s over the rows (min {min(measured):.0f}, max {max(measured):.0f})")
    if args.window_t:
        window_growth(args)
    if not args.no_decoding:
        decoding(args)
    if not args.no_overhead:
        overhead()
    if args.memory_t:
        peak_memory(args)
    if args.tune:
        tune(args)
    if not args.no_plot:
        plot(rows, args.plot)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
