"""Training throughput on the CPU: our GPT against nanoGPT's model, eager and compiled.

The competitor is nanoGPT's ``model.py`` (Karpathy, MIT licence) when you give its path
(``--nanogpt PATH`` or the environment variable ``MASKEDATTN_NANOGPT``; it is never part of this
package: fetch it yourself, e.g. from github.com/karpathy/nanoGPT). Without it the competitor is
``PlainGPT`` below, the same architecture written plainly: ``nn.Linear`` layers,
``scaled_dot_product_attention(is_causal=True)``, tied embeddings, a GELU MLP.

Both models take full AdamW steps (forward, backward, update; the same optimizer settings for
both) on the same random batches, timed alternately in one process; the table shows medians
and the throughput ratio ours/theirs (above 1.0: we are faster).

Alternating in one process keeps both models under the same machine state, but not under the
same heap: each step runs on the memory the other's step left, and glibc's choice of which
freed memory to return to the system (every page taken back is a page fault, and a zeroed
page, when it is used again) then depends on the pair. ``--processes N`` times each model in a
fresh process of its own instead, N rounds interleaved (ours, theirs, ours, ...): one model per
process, as training runs. ``--heap keep`` takes the heap out of either protocol: glibc is
told to keep what is freed (:func:`keep_heap`), so after warm-up no step faults in memory that
an earlier step gave back, and the times compare the steps' work. BENCHMARKS.md records all.

    python benchmarks/train_cpu.py --nanogpt /tmp/nanoGPT/model.py
    python benchmarks/train_cpu.py --dtype bfloat16      # under bfloat16 autocast
    python benchmarks/train_cpu.py --compile             # torch.compile of both models
    python benchmarks/train_cpu.py --processes 3         # each model in its own processes
    python benchmarks/train_cpu.py --heap keep           # no memory handed back to the system

With ``--compile`` both models go through ``torch.compile`` and the table adds our eager step
as a third contestant (a copy of our model: each contestant trains weights of its own); the
number of graphs and graph breaks of each compiled forward (``torch._dynamo.explain``) is
printed, since every break costs a trip through Python.

Every step's loss is checked after the timing: a step on non-finite weights would time
arithmetic on NaN, so the benchmark stops with an error instead of printing a table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import io
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import Failure
from ..model import GPT, GPTConfig
from . import count

NANOGPT_ENV = "MASKEDATTN_NANOGPT"  # path of nanoGPT's model.py, if --nanogpt is not given


class PlainBlock(nn.Module):
    """One transformer block as nanoGPT writes it."""

    def __init__(self, c: int, n_head: int, approximate: str) -> None:
        super().__init__()
        self.n_head, self.approximate = n_head, approximate
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc, self.out = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate=self.approximate))


class PlainGPT(nn.Module):
    """nanoGPT's model, written plainly: the competitor when nanoGPT's file is not given."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        c = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, c)
        self.wpe = nn.Embedding(config.context, c)
        approximate = "tanh" if config.mlp == "gelu" else "none"
        self.blocks = nn.ModuleList(PlainBlock(c, config.n_head, approximate)
                                    for _ in range(config.n_layer))
        self.ln = nn.LayerNorm(c)
        self.head = nn.Linear(c, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def competitor(config: GPTConfig, nanogpt: str | None) -> tuple[str, nn.Module, Loss]:
    """nanoGPT's GPT built from the file at ``nanogpt`` (same shape as ours), else PlainGPT."""
    if not nanogpt:
        return "PlainGPT (SDPA)", PlainGPT(config), lambda m, x, y: m(x, y)
    if config.mlp != "gelu_exact":
        raise SystemExit(f"nanoGPT's model has the exact (erf) GELU only, not mlp={config.mlp!r}:"
                         " compare with --gelu exact (mlp='gelu_exact')")
    path = Path(nanogpt)
    if not path.is_file():
        raise SystemExit(f"--nanogpt: no file {path} (the path of nanoGPT's model.py)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks the module up by name
    spec.loader.exec_module(module)
    theirs = module.GPTConfig(block_size=config.context, vocab_size=config.vocab_size,
                              n_layer=config.n_layer, n_head=config.n_head,
                              n_embd=config.n_embd, dropout=0.0, bias=config.bias)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        model = module.GPT(theirs)
    return "nanoGPT", model, lambda m, x, y: m(x, y)[1]


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_heap() -> None:
    """Have glibc keep freed memory for reuse instead of returning it to the system: no
    trimming of the heap's top, blocks up to 32 MiB (glibc's largest threshold) from the heap
    rather than from mmap, and the heap grown 64 MiB at a time. This process only, until it
    ends. Raises SystemExit where the C library is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        raise SystemExit("--heap keep needs glibc's mallopt; this C library has none")
    settings = ((_M_TRIM_THRESHOLD, 2**31 - 1), (_M_MMAP_THRESHOLD, 32 << 20),
                (_M_TOP_PAD, 64 << 20))
    if not all(mallopt(param, value) == 1 for param, value in settings):
        raise SystemExit("--heap keep: glibc refused a mallopt setting")


def _ours(config: GPTConfig) -> tuple[str, nn.Module, Loss]:
    """Our GPT, as :func:`competitor` gives theirs."""
    return "maskedattn", GPT(config), lambda m, x, y: m(x, y).loss


def _step_fn(model: nn.Module, loss_of: Loss, dtype: torch.dtype,
             optimizer: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step of ``model``: returns its loss, detached."""
    kind = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optimizer]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kind)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _check_finite(name: str, losses: list[torch.Tensor]) -> None:
    """Steps that train on NaN time arithmetic on NaN, not training: stop at the first one."""
    for i, loss in enumerate(losses, 1):
        if not math.isfinite(loss.item()):
            raise Failure(f"{name}: the loss of step {i} (warm-up included) is {loss.item()};"
                          " a step on non-finite weights times nothing worth reporting")


def graph_breaks(model: nn.Module, loss_of: Loss, x: torch.Tensor, y: torch.Tensor,
                 dtype: torch.dtype) -> tuple[int, int]:
    """(graphs, graph breaks) that torch.compile makes of the model's loss computation."""
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return loss_of(model, x, y)

    explained = torch._dynamo.explain(loss)(x, y)
    torch._dynamo.reset()
    return explained.graph_count, explained.graph_break_count


def measure(config: GPTConfig, batch: int, dtype: torch.dtype, repeats: int, warmup: int, *,
            nanogpt: str | None = None, compile: bool = False, optimizer: str = "default",
            clock: Callable[[], float] = time.perf_counter,
            ) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """Median seconds per training step of each contestant, timed alternately.

    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU time,
    which on a machine shared with other work says more about the work each step does.
    Returns the medians by name (ours first, the competitor last) and, with ``compile``, the
    (graphs, graph breaks) of each compiled model.
    """
    torch.manual_seed(0)
    name, plain, plain_loss = competitor(config, nanogpt)
    _, ours, ours_loss = _ours(config)
    x = torch.randint(0, config.vocab_size, (batch, config.context))
    y = torch.randint(0, config.vocab_size, (batch, config.context))
    breaks: dict[str, tuple[int, int]] = {}
    if compile:
        breaks["maskedattn"] = graph_breaks(ours, ours_loss, x, y, dtype)
        breaks[name] = graph_breaks(plain, plain_loss, x, y, dtype)
        eager = copy.deepcopy(ours)  # its own weights: each contestant trains one model
        steps = {
            "maskedattn compiled": _step_fn(torch.compile(ours), ours_loss, dtype, optimizer),
            "maskedattn eager": _step_fn(eager, ours_loss, dtype, optimizer),
            f"{name} compiled": _step_fn(torch.compile(plain), plain_loss, dtype, optimizer),
        }
    else:
        steps = {
            "maskedattn": _step_fn(ours, ours_loss, dtype, optimizer),
            name: _step_fn(plain, plain_loss, dtype, optimizer),
        }
    losses: dict[str, list[torch.Tensor]] = {label: [] for label in steps}
    for label, step in steps.items():
        for _ in range(warmup):
            losses[label].append(step(x, y))
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            t0 = clock()
            losses[label].append(step(x, y))
            times[label].append(clock() - t0)
    for label, ls in losses.items():
        _check_finite(label, ls)
    return {label: statistics.median(ts) for label, ts in times.items()}, breaks


def measure_apart(config: GPTConfig, batch: int, dtype: torch.dtype, repeats: int, warmup: int,
                  rounds: int, *, nanogpt: str | None = None, optimizer: str = "default",
                  clock: Callable[[], float] = time.perf_counter, threads: int | None = None,
                  keep: bool = False) -> dict[str, float]:
    """Median seconds per training step of each model, each timed in fresh processes of its
    own: ``rounds`` rounds, each one process for ours and then one for the competitor's, each
    process ``warmup`` untimed and ``repeats`` timed steps. ``clock`` as for :func:`measure`
    (a module-level function, which the processes receive by name); ``keep``: each process
    calls :func:`keep_heap` first."""
    times: dict[str, list[float]] = {}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: a fresh heap
    with context.Pool(1, maxtasksperchild=1) as pool:  # one process per task
        for _ in range(rounds):
            for ours in (True, False):
                name, ts = pool.apply(_time_alone, (ours, config, batch, dtype, repeats, warmup,
                                                    nanogpt, optimizer, clock, threads, keep))
                times.setdefault(name, []).extend(ts)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _time_alone(ours: bool, config: GPTConfig, batch: int, dtype: torch.dtype, repeats: int,
                warmup: int, nanogpt: str | None, optimizer: str, clock: Callable[[], float],
                threads: int | None, keep: bool) -> tuple[str, list[float]]:
    """(name, seconds of each timed step) of one model, the only one in this process."""
    if threads:
        torch.set_num_threads(threads)
    if keep:
        keep_heap()
    torch.manual_seed(0)
    name, model, loss = _ours(config) if ours else competitor(config, nanogpt)
    x = torch.randint(0, config.vocab_size, (batch, config.context))
    y = torch.randint(0, config.vocab_size, (batch, config.context))
    step = _step_fn(model, loss, dtype, optimizer)
    losses = [step(x, y) for _ in range(warmup)]
    times = []
    for _ in range(repeats):
        t0 = clock()
        losses.append(step(x, y))
        times.append(clock() - t0)
    _check_finite(name, losses)
    return name, times


def main(argv: list[str] | None = None) -> int:
    """Print the throughput table."""
    p = argparse.ArgumentParser(prog="maskedattn bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=count(), default=6)
    p.add_argument("--n-head", type=count(), default=6)
    p.add_argument("--n-embd", type=count(), default=384)
    p.add_argument("--context", type=count(), default=256)
    p.add_argument("--batch", type=count(), default=12)
    p.add_argument("--vocab", type=count(), default=256, help="vocabulary (bytes: 256)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: both models under torch.autocast")
    p.add_argument("--repeats", type=count(), default=10)
    p.add_argument("--warmup", type=count(0), default=3)
    p.add_argument("--nanogpt", default=os.environ.get(NANOGPT_ENV),
                   help=f"path of nanoGPT's model.py, the competitor (default: ${NANOGPT_ENV};"
                        " without it: PlainGPT, the same model written plainly)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models; also time our eager step")
    p.add_argument("--optimizer", choices=["default", "foreach", "fused"], default="default",
                   help="torch.optim.AdamW implementation, the same for both (default: torch's"
                        " choice, a per-parameter loop on the CPU, as nanoGPT gets there)")
    p.add_argument("--gelu", choices=["exact", "tanh"], default="exact",
                   help="the MLP's GELU in both models: exact (erf; nanoGPT's, PyTorch's"
                        " default) or tanh (GPT-2's approximation; PlainGPT only)")
    p.add_argument("--processes", type=count(0), default=0, metavar="ROUNDS",
                   help="time each model alone in fresh processes, ROUNDS rounds interleaved"
                        " (default 0: both in this process, timed alternately; see above)")
    p.add_argument("--heap", choices=["system", "keep"], default="system",
                   help="keep: glibc keeps freed memory instead of handing it back to the"
                        " system, so no step pays page faults for memory an earlier one"
                        " returned (default system: glibc's own choice; see above)")
    p.add_argument("--threads", type=count(), default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time each step by this process's CPU time (all threads), for a"
                        " busy shared machine; best with --threads 1")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig.preset("tiny", n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd, context=args.context, vocab_size=args.vocab,
                              mlp="gelu_exact" if args.gelu == "exact" else "gelu")
    dtype = getattr(torch, args.dtype)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.processes and args.compile:
        p.error("--processes times eager steps only; leave out --compile")
    if args.processes:
        breaks: dict[str, tuple[int, int]] = {}
        result = measure_apart(config, args.batch, dtype, args.repeats, args.warmup,
                               args.processes, nanogpt=args.nanogpt, optimizer=args.optimizer,
                               clock=clock, threads=args.threads, keep=args.heap == "keep")
    else:
        if args.heap == "keep":
            keep_heap()
        result, breaks = measure(config, args.batch, dtype, args.repeats, args.warmup,
                                 nanogpt=args.nanogpt, compile=args.compile,
                                 optimizer=args.optimizer, clock=clock)
    tokens = args.batch * args.context
    params = GPT(config).num_params()
    print(f"training step, {params / 1e6:.1f}M parameters, batch {args.batch} x {args.context}"
          f" tokens, {args.dtype}, AdamW {args.optimizer}, {torch.get_num_threads()} threads,"
          f" torch {torch.__version__}, {platform.processor() or platform.machine()};"
          f" {args.clock} clock, {args.heap} heap, median of {args.repeats}"
          + (f" steps in each of {args.processes} processes per model" if args.processes
             else ", in one process"))
    for name, (graphs, n_breaks) in breaks.items():
        print(f"torch.compile of {name}: {graphs} graph(s), {n_breaks} graph break(s)")
    print(f"{'model':<28}{'ms/step':>10}{'tokens/s':>12}")
    for name, seconds in result.items():
        print(f"{name:<28}{seconds * 1e3:>10.1f}{tokens / seconds:>12.0f}")
    names = list(result)
    theirs = result[names[-1]]
    for name in names[:-1]:
        print(f"throughput ratio {name} / {names[-1]}: {theirs / result[name]:.2f}x"
              " (above 1.0: ours is faster)")
    if args.compile:
        speedup = result[names[1]] / result[names[0]]
        print(f"compiling ours: eager time / compiled time = {speedup:.2f}x")
    return 0
