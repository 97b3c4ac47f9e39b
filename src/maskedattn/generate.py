"""Text generation with a KV cache: prefill the prompts, then decode one token at a time.

>>> import maskedattn as ma
>>> model = ma.GPT(ma.GPTConfig.preset("tiny"))
>>> new = ma.generate(model, [[72, 105], [79]], max_new_tokens=5, temperature=0)
>>> [len(row) for row in new]
[5, 5]

The loop, in gpt-fast's names::

    logits = prefill(model, prompts, cache)          # every prompt token at once
    repeat:
        token = sample(logits, settings, ...)         # one token per row
        logits = decode_one_token(model, token, ...)  # attends over the cache, extends it

Prompts of different lengths run as one batch: they are right-padded, every row writes its
keys and values at its own positions, and ``Padding(lengths)`` keeps each row from reading
past its own length, so each row gets exactly the tokens it would get alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention.kv_cache import KVCache
from .model import GPT

__all__ = ["SamplingSettings", "decode_one_token", "generate", "prefill", "sample", "stream"]

Prompts = Sequence[Sequence[int]] | Tensor
SEED_LIMIT = 2**63


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen from the logits; applied in this order.

    - ``repetition_penalty`` (CTRL, Keskar et al. 2019): the logit of every token already in
      the row (prompt included) is divided by it when positive, multiplied when negative.
    - ``temperature``: 0 picks the most likely token (greedy, nothing below applies); otherwise
      logits are divided by it before the softmax (below 1: sharper, above 1: flatter).
    - ``top_k``: keep only the k most likely tokens.
    - ``top_p``: keep the smallest set of most likely tokens whose probability reaches p.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not _number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got"
                             f" {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not _number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")
        if not _number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a positive number (1: none), got"
                             f" {self.repetition_penalty!r}")


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def generate(model: GPT, prompts: Prompts, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, stop_tokens: Sequence[int] = (),
             seed: int | None = None, compile: bool = False) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: the language model.
        prompts: token-id lists, one per row (lengths may differ), or a (B, T) tensor.
        max_new_tokens: how many tokens to add to each prompt at most.
        temperature, top_k, top_p, repetition_penalty: see :class:`SamplingSettings`;
            ``temperature=0`` is greedy decoding.
        stop_tokens: a row stops after producing one of these (it is included in its output).
        seed: makes sampling reproducible. Row i draws from its own generator seeded with
            ``seed + i``, so it gets the tokens it would get alone with that seed.
        compile: decode through ``torch.compile`` of :func:`decode_one_token` (one graph over
            the static cache, compiled once per model and batch shape: about 20 s for GPT-2
            124M on two cores, then no Python between the kernels; faster per token on the CPU
            once the compile is paid, see BENCHMARKS.md). The same tokens as eager decoding.

    Returns:
        the new tokens of each row (without the prompt).
    """
    rows = _as_prompts(prompts)
    out: list[list[int]] = [[] for _ in rows]
    for step in stream(model, rows, max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, repetition_penalty=repetition_penalty,
                       stop_tokens=stop_tokens, seed=seed, compile=compile):
        for row, token in zip(out, step, strict=True):
            if token is not None:
                row.append(token)
    return out


@torch.inference_mode()
def stream(model: GPT, prompts: Prompts, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None,
           repetition_penalty: float = 1.0, stop_tokens: Sequence[int] = (),
           seed: int | None = None, compile: bool = False) -> Iterator[list[int | None]]:
    """Like :func:`generate`, but yield as soon as each token exists.

    Each step yields one entry per prompt: the row's new token, or ``None`` once the row has
    stopped. Iteration ends when every row has stopped or after ``max_new_tokens`` steps.
    """
    settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
    rows = _as_prompts(prompts)
    stops = _check_request(model, rows, max_new_tokens, stop_tokens)
    if max_new_tokens == 0:
        return
    device = model.lm_head.weight.device
    lengths = torch.tensor([len(r) for r in rows], device=device)
    cache = model.new_cache(len(rows), int(lengths.max()) + max_new_tokens)
    generators = _generators(seed, len(rows), device)
    seen = _seen_tokens(rows, model.config.vocab_size, device) \
        if settings.repetition_penalty != 1.0 else None

    logits = prefill(model, rows, cache)
    decode = _compiled_decode() if compile else decode_one_token
    running = [True] * len(rows)
    for step in range(max_new_tokens):
        token = sample(logits, settings, generators, seen)  # (B,)
        new = token.tolist()
        yield [t if alive else None for t, alive in zip(new, running, strict=True)]
        running = [alive and t not in stops for t, alive in zip(new, running, strict=True)]
        if not any(running) or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen[torch.arange(len(rows), device=device), token] = True
        logits = decode(model, token, lengths, cache)
        lengths += 1


def prefill(model: GPT, prompts: Sequence[Sequence[int]], cache: Sequence[KVCache]) -> Tensor:
    """Run every prompt token through the model, filling the cache; logits of each row's last
    token, (B, V).

    Prompts are right-padded to one length: causal attention keeps every real token from
    seeing the padding after it, and the padding's keys are never read later (decoding masks
    each row to its own length).
    """
    device = model.lm_head.weight.device
    longest = max(len(p) for p in prompts)
    padded = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    hidden = model.hidden_states(padded, cache=cache)  # (B, T, C)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    # Only the positions we sample from go through the LM head: (B, C) @ (C, V), not (B, T, V).
    return model.lm_head(hidden[torch.arange(len(prompts), device=device), last])


_SERIAL_CHUNK = 1 << 16


@functools.cache
def _compiled_decode():
    # One compiled function for the process: dynamo keys its graphs on the model and shapes.
    # A decode step's element-wise work is a few thousand values per kernel: inductor would
    # split it over OpenMP threads, whose workers then spin on the cores that the GEMV's own
    # helper threads need next (2 threads: 30 ms a token against 25 serial, BENCHMARKS.md).
    # Below _SERIAL_CHUNK values per thread, its kernels run on the calling thread.
    return torch.compile(decode_one_token, fullgraph=True,
                         options={"cpp.min_chunk_size": _SERIAL_CHUNK})


def decode_one_token(model: GPT, token: Tensor, lengths: Tensor,
                     cache: Sequence[KVCache]) -> Tensor:
    """Append one token (B,) to rows holding ``lengths`` (B,) tokens; next-token logits (B, V)."""
    hidden = model.hidden_states(token[:, None], cache=cache, start=lengths)  # (B, 1, C)
    return model.lm_head(hidden[:, 0])


def sample(logits: Tensor, settings: SamplingSettings,
           generators: Sequence[torch.Generator | None] | None = None,
           seen: Tensor | None = None) -> Tensor:
    """Choose one token per row from ``logits`` (B, V); returns (B,) ids.

    ``seen`` (B, V) bool marks the tokens the repetition penalty applies to. ``generators`` holds
    one random generator per row (None entries use torch's global one). Each row's token is
    drawn by inverse transform sampling: one uniform number from the row's generator, located
    in the running sum of the row's probabilities.
    """
    with _serial(logits):
        return _sample(logits, settings, generators, seen)


@contextlib.contextmanager
def _serial(logits: Tensor) -> Iterator[None]:
    # One row of logits is a few ten thousand values, just above torch's grain for splitting
    # an element-wise op over its OpenMP threads (its softmax, sort and running sums are never
    # split: torch splits those by row). Split, each op wakes a worker that then spins on the
    # core the GEMV's helper needs for the next token's products: on 2 cores sampling cost
    # 7-10 ms a GPT-2 token, serial well under one. Several rows gain from the threads (top-p
    # sorts row by row), so they keep them (BENCHMARKS.md). torch's count is the process's:
    # another thread's torch calls in these microseconds run serial too.
    threads = torch.get_num_threads()
    if logits.device.type != "cpu" or logits.shape[0] != 1 or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sample(logits: Tensor, settings: SamplingSettings,
            generators: Sequence[torch.Generator | None] | None,
            seen: Tensor | None) -> Tensor:
    logits = logits.float()
    if seen is not None and settings.repetition_penalty != 1.0:
        p = settings.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
        # A tiny or huge penalty overflows: saturate, so the order of the logits survives.
        big = torch.finfo(logits.dtype).max
        logits = logits.clamp(-big, big)
    # A NaN anywhere in a row is its maximum for argmax and amax (and survives the penalty):
    # one value per row tells, where scanning GPT-2's logits for NaN cost 40-90 us a token.
    if settings.temperature == 0:
        token = logits.argmax(dim=-1)
        _refuse_nan(logits.gather(-1, token[:, None]))
        return token
    top = logits.amax(dim=-1, keepdim=True)
    _refuse_nan(top)
    # Shifted so the largest logit is 0 before dividing: however small the temperature (even
    # one that is 0 in float32), the likeliest tokens keep weight exp(0) = 1, the others tend
    # to exp(-inf) = 0, and no row becomes NaN: greedy in the limit.
    shifted = logits - top
    logits = torch.where(shifted == 0, shifted, shifted / settings.temperature)
    if settings.top_k is not None and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p is not None and settings.top_p < 1:
        probs = _top_p(probs, settings.top_p)
    return _draw(probs, generators or [None] * probs.shape[0])


def _refuse_nan(row_maxima: Tensor) -> None:
    if bool(torch.isnan(row_maxima).any()):
        raise ValueError("the logits to sample from hold NaN: check the model's weights and"
                         " inputs (a diverged checkpoint, or NaN in a tensor it was given)")


#: How many of the likeliest tokens top-p sampling first looks at; beyond ~1000, ``topk`` on
#: GPT-2's vocabulary costs several times more.
_NUCLEUS_GUESS = 768


def _top_p(probs: Tensor, p: float) -> Tensor:
    """``probs`` (B, V) with every token dropped whose more likely tokens already reach ``p``.

    The likeliest tokens come from ``topk`` when its :data:`_NUCLEUS_GUESS` hold the whole
    nucleus (their running sum reaches p in every row), else from a full sort: a trained
    model's nucleus is often that small, and sorting GPT-2's vocabulary costs 4 ms a token
    against 0.1-0.2 ms for the ``topk`` (BENCHMARKS.md). Either way the kept values are the
    full sort's: the running sum of the likeliest tokens is computed in the same order.
    """
    fits = probs.shape[-1] > _NUCLEUS_GUESS
    if fits:
        top, order = probs.topk(_NUCLEUS_GUESS, dim=-1)
        running = top.cumsum(dim=-1)
        fits = bool((running[:, -1] >= p).all())
    if not fits:
        top, order = probs.sort(dim=-1, descending=True)
        running = top.cumsum(dim=-1)
    top = top.masked_fill(running - top >= p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, top)


def _draw(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """One index per row of ``probs`` (B, V), row i with probability probs[i] / probs[i].sum().

    One float64 uniform per row, scaled by the row's total, finds its token in the row's
    running sum: one pass over the row, where ``torch.multinomial`` draws V exponentials
    (a millisecond for GPT-2's vocabulary). The running sum is float64 so that its rounding
    (about V ulps) moves no token's probability by more than ~1e-12.
    """
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError("a row of probabilities to sample from is not finite or all zero:"
                         " its logits are all -inf or one is +inf")
    u = torch.cat([torch.rand(1, 1, generator=g, dtype=torch.float64, device=probs.device)
                   for g in generators]) * total
    # Below the total, however u rounds: a token after the last likely one is never chosen.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    # Token i is the one whose interval [cdf[i-1], cdf[i]) holds u: tokens of probability 0
    # have empty intervals.
    return torch.searchsorted(cdf, u, right=True)[:, 0]


# -- checks ------------------------------------------------------------------------------------


def _as_prompts(prompts: Prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point:
            raise ValueError(f"prompts as a tensor must be integer ids of shape (B, T), got"
                             f" {prompts.dtype} {tuple(prompts.shape)}")
        return prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a non-empty list of token-id lists (one per row) or a"
                        f" (B, T) tensor, got {type(prompts).__name__}; encode text first")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, Tensor):
            p = p.tolist()
        if not isinstance(p, Sequence) or isinstance(p, (str, bytes)) \
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise TypeError(f"prompts[{i}] must be a list of int token ids, got {p!r:.60}"
                            " (for a single prompt pass [ids])")
        rows.append(list(p))
    return rows


def _check_request(model: GPT, rows: list[list[int]], max_new_tokens: int,
                   stop_tokens: Sequence[int]) -> set[int]:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a maskedattn GPT, got {type(model).__name__}")
    vocab, context = model.config.vocab_size, model.config.context
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    for i, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompts[{i}] holds token ids outside the vocabulary [0, {vocab}):"
                             f" {bad[:8]}")
        if len(p) + max_new_tokens > context:
            raise ValueError(
                f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is"
                f" {len(p) + max_new_tokens} positions, beyond the model's context of {context}."
                " Shorten the prompt or ask for fewer tokens."
            )
    stops = set(stop_tokens)
    bad = [t for t in stops if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop_tokens must be token ids in [0, {vocab}), got {bad}")
    return stops


def _generators(seed: int | None, n: int, device: torch.device
                ) -> list[torch.Generator | None] | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        # torch's generators take 64 bits, and row i uses seed + i.
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
    return [torch.Generator(device).manual_seed(seed + i) for i in range(n)]


def _seen_tokens(rows: list[list[int]], vocab: int, device: torch.device) -> Tensor:
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for i, p in enumerate(rows):
        seen[i, torch.as_tensor(p, device=device)] = True
    return seen
