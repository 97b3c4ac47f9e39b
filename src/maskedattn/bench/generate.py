"""Greedy generation on the CPU: our ``generate`` against ``transformers``' on the same weights.

For each dtype it times, in one run and interleaved (median of ``--repeats`` after a warm-up):

- decoding: a ``--prompt``-token prompt continued by ``--new`` tokens, batch 1, greedy,
  end to end (prefill included) for both libraries; tokens per second;
- prefill: one ``--prefill``-token prompt through the model, filling the KV cache and taking
  the last position's logits (``transformers``: ``use_cache=True, logits_to_keep=1``);
- with ``--sample T``, decoding again by sampling at temperature T from the whole vocabulary
  (seeded; the tokens differ between the libraries, whose random streams differ).

Decoding one token reads every weight once, so memory bandwidth sets a floor on its time:
the table shows the bandwidth measured in the same run (a streaming sum over a buffer larger
than the caches) and the fraction of that floor each library reaches.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from .._optional import require
from ..generate import generate, prefill
from ..model import GPT, GPTConfig
from ..model.gemv import native_status
from . import count

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    p = argparse.ArgumentParser(prog="maskedattn bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="model preset (default gpt2, 124M)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    p.add_argument("--prompt", type=count(), default=16, help="prompt tokens when decoding")
    p.add_argument("--new", type=count(), default=128, help="new tokens when decoding")
    p.add_argument("--prefill", type=count(), default=512, help="prompt tokens of the prefill test")
    p.add_argument("--repeats", type=count(), default=5, help="timed runs per measurement")
    p.add_argument("--threads", type=count(), default=None, help="torch threads (default: torch's)")
    p.add_argument("--sample", type=_temperature, default=None, metavar="T",
                   help="also time decoding by sampling at temperature T (> 0), no top-k or"
                        " top-p (default: greedy decoding only)")
    p.add_argument("--compile", action="store_true",
                   help="our decoding through torch.compile (generate(compile=True)); the"
                   " compile happens in the untimed first run")
    p.add_argument("--quick", action="store_true",
                   help="a 2-layer model and short runs: checks the benchmark works")
    args = p.parse_args(argv)
    transformers = require("transformers", "the generation benchmark")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig.preset(args.preset)
    if args.quick:
        config = GPTConfig.preset(args.preset, n_layer=2, n_embd=64, n_head=4, vocab_size=1000)
        args.new, args.prefill, args.repeats = 8, 32, 1
    dtypes = [_dtype(name) for name in args.dtypes.split(",")]

    torch.manual_seed(0)
    base = GPT(config).eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=gen)
    long_prompt = torch.randint(0, config.vocab_size, (1, args.prefill), generator=gen)
    probe = 1 << 26 if args.quick else 1 << 30
    bandwidth = _bandwidth(probe)
    rows, decode = [], []
    for dtype in dtypes:
        ours = GPT(config).eval()
        ours.load_state_dict(base.state_dict())
        ours = ours.to(dtype)
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp, format="transformers")
            theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp, dtype=dtype).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())

        def ours_decode(ours=ours, temperature=0.0, seed=None):
            return generate(ours, prompt, args.new, temperature=temperature, seed=seed,
                            compile=args.compile)[0]

        def theirs_decode(theirs=theirs, **sampling):
            torch.manual_seed(0)  # for sampling; greedy draws nothing
            with torch.inference_mode():
                out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=args.new, min_new_tokens=args.new,
                                      pad_token_id=0, **(sampling or {"do_sample": False}))
            return out[0, args.prompt :].tolist()

        def ours_prefill(ours=ours):
            with torch.inference_mode():
                prefill(ours, long_prompt.tolist(), ours.new_cache(1, args.prefill))

        def theirs_prefill(theirs=theirs):
            with torch.inference_mode():
                theirs(long_prompt, use_cache=True, logits_to_keep=1)

        same = ours_decode() == theirs_decode()
        t_ours, t_theirs = _interleaved(ours_decode, theirs_decode, args.repeats)
        # The machine may be busier at one moment than another: keep the best rate seen.
        bandwidth = max(bandwidth, _bandwidth(probe))
        decode.append(("decode", dtype, args.new / t_ours, args.new / t_theirs, weight_bytes,
                       "same tokens" if same else "TOKENS DIFFER"))
        if args.sample is not None:
            t_ours, t_theirs = _interleaved(
                functools.partial(ours_decode, temperature=args.sample, seed=0),
                functools.partial(theirs_decode, do_sample=True, temperature=args.sample,
                                  top_k=0, top_p=1.0),
                args.repeats)
            decode.append(("sampled", dtype, args.new / t_ours, args.new / t_theirs,
                           weight_bytes, f"temperature {args.sample:g}"))
        p_ours, p_theirs = _interleaved(ours_prefill, theirs_prefill, args.repeats)
        rows.append((f"{_name(dtype)} prefill {args.prefill} ms", 1e3 * p_ours, 1e3 * p_theirs,
                     p_ours / p_theirs, "", ""))
    for kind, dtype, ours_rate, theirs_rate, weight_bytes, check in decode:
        floor = bandwidth / weight_bytes  # tokens/s if the weights streamed at that rate
        rows.append((f"{_name(dtype)} {kind} tok/s", ours_rate, theirs_rate,
                     theirs_rate / ours_rate,
                     f"{ours_rate / floor:.0%} / {theirs_rate / floor:.0%} of {floor:.0f}",
                     check))
    _print(sorted(rows, key=lambda r: "prefill" in r[0]), config, args, bandwidth)
    return 0


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"--dtypes: unknown dtype {name!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[name]


def _temperature(text: str) -> float:
    """argparse type: a finite temperature above 0 (0 would be the greedy row again)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _interleaved(ours: Callable[[], object], theirs: Callable[[], object],
                 repeats: int) -> tuple[float, float]:
    """Median seconds of each, alternating runs so both see the same machine load."""
    ours()
    theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _bandwidth(nbytes: int) -> float:
    """Bytes per second that a streaming read (a sum over ``nbytes``) reaches, best of 5."""
    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def _print(rows, config: GPTConfig, args, bandwidth: float) -> None:
    kinds = "greedy" if args.sample is None else f"greedy and sampled (T={args.sample:g})"
    print(f"{kinds} generation, {args.preset} ({config.n_layer} layers, C={config.n_embd},"
          f" V={config.vocab_size}), batch 1, prompt {args.prompt}, {args.new} new tokens;"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads; median of"
          f" {args.repeats}{'; ours compiled' if args.compile else ''}")
    print(f"best read bandwidth seen {bandwidth / 1e9:.1f} GB/s (streaming sum); linear layers:"
          f" {native_status()}")
    head = ("measure", "ours", "transformers", "time ours/theirs", "of bandwidth floor", "check")
    print(f"{head[0]:<26}{head[1]:>10}{head[2]:>14}{head[3]:>18}  {head[4]:<24}{head[5]}")
    for name, ours, theirs, ratio, floor, check in rows:
        print(f"{name:<26}{ours:>10.1f}{theirs:>14.1f}{ratio:>18.2f}  {floor:<24}{check}")
