"""Flash attention on the GPU: our Triton kernels against SDPA's flash backend and FlexAttention.

The issue's setting: B*T = 16k tokens, H*D = 2048, bfloat16, T from 512 to 16k, causal and not,
forward and backward. Each row times the three in the same run (median of CUDA-event timings
after warm-up, ``triton.testing.do_bench``) and reports TFLOP/s, counted as 4*B*H*T*T*D for the
forward (halved when causal) and 2.5 times that for the backward, and the fraction of the bf16
matrix-product rate measured on this card at the start of the run.

"ours" times the backend as ``attention()`` calls it, on a call validated once; the "api"
column times the whole ``attention()`` call (validation, the NaN check of v, the mask rule),
which adds a fixed cost per call. Each row also checks our output and gradients against SDPA.

    maskedattn bench attention_gpu                  # the full table
    maskedattn bench attention_gpu --lens 1024 16384 --head-dims 128 --flex-lens 16384
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from collections.abc import Callable

import torch
from torch import Tensor

import maskedattn as ma
from maskedattn._optional import require
from maskedattn.attention import Causal
from maskedattn.attention import triton as triton_backend
from maskedattn.attention.lowering import lower_call
from maskedattn.bench import count

COMPETITORS = ("triton", "sdpa_flash", "flex")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskedattn bench attention_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=count(), default=16384, help="B*T (default 16384)")
    p.add_argument("--width", type=count(), default=2048, help="H*D (default 2048)")
    p.add_argument("--head-dims", type=count(), nargs="+", default=[64, 128])
    p.add_argument("--lens", type=count(), nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384],
                   help="sequence lengths T")
    p.add_argument("--masks", nargs="+", choices=["causal", "none"], default=["causal", "none"])
    p.add_argument("--flex-lens", type=count(), nargs="*", default=None,
                   help="time FlexAttention only at these T (each compiles; default: all)")
    p.add_argument("--rep-ms", type=count(), default=200, help="timing window per measurement")
    p.add_argument("--json", help="also write every row to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns the exit status."""
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_gpu: no CUDA device; nothing to measure")
        return 1
    triton = require("triton", "the GPU attention benchmark")
    from triton.testing import do_bench

    def median_ms(fn: Callable[[], object]) -> float:
        return do_bench(fn, warmup=50, rep=args.rep_ms, return_mode="median")

    peak = _matmul_tflops(median_ms)
    device = torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}, triton {triton.__version__};"
          f" bf16 matmul 8192^3: {peak:.0f} TFLOP/s (the 100% below)")
    header = (f"{'T':>6} {'D':>4} {'mask':>6} {'pass':>4} | {'ours ms':>8} {'TFLOP/s':>7}"
              f" {'%peak':>5} {'api ms':>7} | {'sdpa':>7} {'ratio':>5} | {'flex':>7}"
              f" {'ratio':>5} | err")
    print(header)
    print("-" * len(header))
    rows = []
    for d in args.head_dims:
        for t in args.lens:
            for mask in args.masks:
                with_flex = args.flex_lens is None or t in args.flex_lens
                for row in _measure(args.tokens // t, args.width // d, t, d, mask == "causal",
                                    with_flex, median_ms):
                    rows.append(row)
                    print(_format(row, peak), flush=True)
    print("ratio = our time / their time (below 1.0: we are faster); TFLOP/s columns are"
          " 4*B*H*T*T*D (/2 causal), x2.5 for the backward; err = relative difference from"
          " SDPA (output, or the worst of dq, dk, dv)")
    from maskedattn.attention import _triton_kernels

    for name in ("fwd", "dkdv", "dq"):
        for key, config in _triton_kernels._autotuned(name).cache.items():
            # the key's values come first, then the arguments' dtypes
            named = dict(zip(_triton_kernels._TUNING_KEY, key, strict=False))
            print(f"autotuned {name} D={named['HEAD_DIM']} causal={named['CAUSAL']}: {config}")
    if args.json:
        meta = dict(date=datetime.date.today().isoformat(), device=device,
                    torch=torch.__version__, host=platform.node(), matmul_tflops=peak)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


def _matmul_tflops(median_ms) -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / median_ms(lambda: a @ b) / 1e9


def _attention_fns(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                   with_flex: bool) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    mask = Causal() if causal else None
    call = lower_call(q, k, v, mask)

    def ours(q, k, v):
        return triton_backend.run(q, k, v, call)[0]

    def api(q, k, v):
        return ma.attention(q, k, v, mask, backend="triton")

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return scaled_dot_product_attention(q, k, v, is_causal=causal)

    fns = {"triton": ours, "api": api, "sdpa_flash": sdpa_flash}
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        torch._dynamo.config.cache_size_limit = 64  # one compiled graph per shape
        compiled = torch.compile(flex_attention)
        block_mask = None
        if causal:
            t = q.shape[2]
            block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, t, t,
                                           device="cuda")
        fns["flex"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    return fns


def _measure(b: int, h: int, t: int, d: int, causal: bool, with_flex: bool,
             median_ms) -> list[dict]:
    """Forward and backward times of every competitor for one shape; one row per pass."""
    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    flops = 4 * b * h * t * t * d / (2 if causal else 1)
    times: dict[str, dict[str, float]] = {"fwd": {}, "bwd": {}}
    results: dict[str, list[Tensor]] = {}
    for name, fn in _attention_fns(q, k, v, causal, with_flex).items():
        with torch.no_grad():
            times["fwd"][name] = median_ms(lambda fn=fn: fn(q, k, v))
        if name == "api":  # the same backward as ours
            continue
        out = fn(q, k, v)
        results[name] = [out.detach(), *torch.autograd.grad(out, (q, k, v), do,
                                                            retain_graph=True)]
        times["bwd"][name] = median_ms(lambda out=out: torch.autograd.grad(
            out, (q, k, v), do, retain_graph=True))
        del out
    errs = [_relative(a, b) for a, b in zip(results["triton"], results["sdpa_flash"],
                                            strict=True)]
    return [
        dict(T=t, D=d, B=b, H=h, mask="causal" if causal else "none", pass_=p,
             tflop=flops * (2.5 if p == "bwd" else 1.0) / 1e12, ms=times[p],
             err_vs_sdpa=errs[0] if p == "fwd" else max(errs[1:]))
        for p in ("fwd", "bwd")
    ]


def _relative(x: Tensor, ref: Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _format(row: dict, peak: float) -> str:
    ms = row["ms"]
    ours = ms["triton"]
    rate = row["tflop"] / ours * 1e3
    api = f"{ms['api']:>7.3f}" if "api" in ms else f"{'':>7}"
    cells = [f"{row['T']:>6} {row['D']:>4} {row['mask']:>6} {row['pass_']:>4} |"
             f" {ours:>8.3f} {rate:>7.0f} {100 * rate / peak:>4.0f}% {api} |"]
    for name in COMPETITORS[1:]:
        if name in ms:
            theirs = row["tflop"] / ms[name] * 1e3
            cells.append(f" {theirs:>7.0f} {ours / ms[name]:>5.2f} |")
        else:
            cells.append(f" {'-':>7} {'-':>5} |")
    cells.append(f" {row['err_vs_sdpa']:.1e}")
    return "".join(cells)
