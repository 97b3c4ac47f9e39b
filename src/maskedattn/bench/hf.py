"""transformers models on the CPU with ``attn_implementation="maskedattn"`` against ``"sdpa"``.

One randomly initialised model per architecture, the same weights for every backend (the
model switches with ``set_attn_implementation`` between runs, alternating, median of
``--repeats`` after a warm-up):

- prefill: one forward over a batch-1 prompt of each ``--lengths`` (no cache, the last
  position's logits only, as ``generate``'s prefill needs), end-to-end model time; ``eager``
  too up to ``--eager-max`` tokens (it materialises every T x T score matrix);
- floor (``--floor``): the same prefill with every attention call replaced by zeros, which no
  attention backend can beat: ``floor / sdpa`` bounds the ratio any backend can reach, since
  the rest of the model (linear layers, norms, RoPE) is the same whoever computes attention;
- decode: tokens per second of ``generate`` (greedy, dynamic cache) continuing a
  ``--context``-token prompt, measured as the time of ``1 + --new`` new tokens minus that of 1.

Architectures: ``llama`` (12 layers, width 768, 12 query / 4 key-value heads, SwiGLU 2048,
vocabulary 32000) and ``gpt2`` (124M; its position table is widened to the longest length).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .._optional import require
from ..integrations.transformers import register
from . import count
from .generate import _dtype, _name

_IMPLS = ("maskedattn", "sdpa", "eager")
_FLOOR = "no-attention"


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    """A transformers attention function that computes nothing: (B, T, H, D) zeros."""
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None


def _register_floor() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_FLOOR, _no_attention)
    # No mask to build either: our mask function's structure is never looked at.
    AttentionMaskInterface.register(_FLOOR, lambda *args, **kwargs: None)


def _model(arch: str, longest: int, quick: bool = False):
    transformers = require("transformers", "the transformers benchmark")
    # --quick: 2 layers of width 64, to check that the benchmark runs.
    small = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if quick else {}
    if arch == "llama":
        config = transformers.LlamaConfig(**{
            **dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                   num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
            **small}, max_position_embeddings=longest)
    elif arch == "gpt2":
        config = transformers.GPT2Config(n_positions=longest, **(
            dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4) if quick else {}))
    else:
        raise ValueError(f"--archs: unknown architecture {arch!r}; choose llama or gpt2")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _timed(model, impls: list[str], fn, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of ``fn()`` per implementation, runs alternating.

    CPU seconds (of every thread of this process) are what the work costs; on a shared,
    loaded machine the wall time mostly says how long the process waited for a core.
    """
    times: dict[str, list[tuple[float, float]]] = {impl: [] for impl in impls}
    for rep in range(repeats + 1):  # the first round warms up
        for impl in impls:
            model.set_attn_implementation(impl)
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            if rep:
                times[impl].append((time.perf_counter() - start, time.process_time() - cpu))
    return {impl: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for impl, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    p = argparse.ArgumentParser(prog="maskedattn bench hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="llama,gpt2", help="comma-separated: llama, gpt2")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    p.add_argument("--lengths", default="1024,2048,4096", help="prefill lengths")
    p.add_argument("--eager-max", type=count(0), default=2048,
                   help="time eager only up to this length (default 2048)")
    p.add_argument("--context", type=count(0), default=2048,
                   help="prompt tokens before decoding (0: no decode test)")
    p.add_argument("--new", type=count(), default=16, help="tokens decoded in the decode test")
    p.add_argument("--repeats", type=count(), default=3, help="timed runs per measurement")
    p.add_argument("--floor", action="store_true",
                   help="also time prefill with attention replaced by zeros: the bound on"
                   " what any attention backend can reach")
    p.add_argument("--viz", type=count(0), default=0, metavar="T",
                   help="instead: time capture_attention of every row of a T-token input on"
                   " gpt2 (12 layers, 12 heads) and writing its HTML page")
    p.add_argument("--quick", action="store_true",
                   help="tiny models and short lengths: checks that it works")
    args = p.parse_args(argv)
    register()
    if args.floor:
        _register_floor()
    if args.viz:
        return _viz_time(args.viz)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        lengths, args.context, args.new, args.repeats = [64, 128], 64, 2, 1
    dtypes = [_dtype(name) for name in args.dtypes.split(",")]
    print(f"transformers prefill and decode on the CPU, batch 1; torch {torch.__version__},"
          f" {torch.get_num_threads()} threads; median of {args.repeats} after a warm-up")
    print(f"{'model':<8}{'dtype':<10}{'measure':<26}{'maskedattn':>12}{'sdpa':>10}"
          f"{'eager':>10}{'ours/sdpa':>11}")
    if args.floor:
        print("(floor: attention replaced by zeros; the note gives floor/sdpa)")
    gen = torch.Generator().manual_seed(1)
    for arch in args.archs.split(","):
        base = _model(arch, max(*lengths, args.context + args.new + 1), args.quick)
        vocab = base.config.vocab_size
        for dtype in dtypes:
            model = base.to(dtype).eval()
            for t in lengths:
                ids = torch.randint(0, vocab, (1, t), generator=gen)
                impls = [i for i in _IMPLS if i != "eager" or t <= args.eager_max]
                impls += [_FLOOR] if args.floor else []

                def prefill(ids=ids, model=model):
                    with torch.inference_mode():
                        model(ids, use_cache=False, logits_to_keep=1)

                timed = _timed(model, impls, prefill, args.repeats)
                for kind, j in (("wall", 0), ("CPU", 1)):
                    ms = {k: 1e3 * v[j] for k, v in timed.items()}
                    floor = (f"floor {ms[_FLOOR]:.1f} ms, floor/sdpa"
                             f" {ms[_FLOOR] / ms['sdpa']:.2f}") if args.floor else ""
                    _row(arch, dtype, f"prefill {t} {kind} ms", ms,
                         ms["maskedattn"] / ms["sdpa"], floor)
            if args.context:
                prompt = torch.randint(0, vocab, (1, args.context), generator=gen)

                def run(n, prompt=prompt, model=model):
                    with torch.inference_mode():
                        return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                              max_new_tokens=n, min_new_tokens=n,
                                              do_sample=False, pad_token_id=0)

                impls = ["maskedattn", "sdpa"]
                same = torch.equal(*(_with(model, i, lambda: run(args.new + 1)) for i in impls))
                one = _timed(model, impls, lambda: run(1), args.repeats)
                many = _timed(model, impls, lambda: run(args.new + 1), args.repeats)
                for kind, j in (("wall", 0), ("CPU", 1)):
                    # A difference of noisy times: nan where the machine's noise swamped it.
                    rate = {i: args.new / d if (d := many[i][j] - one[i][j]) > 0
                            else float("nan") for i in impls}
                    _row(arch, dtype, f"decode@{args.context} {kind} tok/s", rate,
                         rate["sdpa"] / rate["maskedattn"],
                         "same tokens" if same else "TOKENS DIFFER")
        del base
    return 0


def _viz_time(t: int) -> int:
    """Seconds to capture every attention row of a t-token input, and to write the page."""
    import tempfile
    from pathlib import Path

    from ..viz import write_html
    from ..viz.capture import capture_attention

    model = _model("gpt2", t).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, t), generator=torch.Generator())
    start, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), capture_attention(model) as cap:
        model(ids, use_cache=False, logits_to_keep=1)
    maps = cap.maps([str(i) for i in ids[0].tolist()])
    captured, cpu1 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        page = write_html(maps, Path(tmp) / "attention.html")
        size = page.stat().st_size
    done, cpu2 = time.perf_counter(), time.process_time()
    # CPU seconds too: on a shared machine they say what the work costs, wall time how busy
    # the machine was.
    print(f"gpt2 (12 layers x 12 heads), {t} tokens, every row: capture"
          f" {captured - start:.1f} s (CPU {cpu1 - cpu0:.1f} s), page {done - captured:.1f} s"
          f" (CPU {cpu2 - cpu1:.1f} s, {size / 1e6:.1f} MB), total {done - start:.1f} s"
          f" (CPU {cpu2 - cpu0:.1f} s); torch {torch.get_num_threads()} threads")
    return 0


def _with(model, impl: str, fn):
    model.set_attn_implementation(impl)
    return fn()


def _row(arch, dtype, measure, values, ratio, note="") -> None:
    cells = "".join(f"{values[i]:>{w}.1f}" if i in values else f"{'-':>{w}}"
                    for i, w in (("maskedattn", 12), ("sdpa", 10), ("eager", 10)))
    print(f"{arch:<8}{_name(dtype):<10}{measure:<26}{cells}{ratio:>11.2f}  {note}", flush=True)
