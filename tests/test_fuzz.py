"""Fuzzing: random argument vectors for the command line, random calls of ``attention()``.

The command line must answer every argument vector with exit status 0, 1 or 2 and, when it
refuses, one line saying why: never a traceback. ``attention()`` must either refuse a call with
a ``ValueError``/``TypeError`` or compute what an oracle written here computes: float64 scores,
the mask predicates spelled out position by position, softmax, rows that see no key give 0.

The default run is a small budget; ``-m slow`` runs a long one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maskedattn as ma
from maskedattn.attention.masks import (
    Causal,
    DenseMask,
    Documents,
    Padding,
    PrefixLM,
    SlidingWindow,
)
from maskedattn.cli.main import build_parser, main
from maskedattn.model import GPT, GPTConfig

QUICK = settings(max_examples=40, deadline=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
QUICK_CLI = settings(QUICK, max_examples=20)
LONG_CLI = settings(LONG, max_examples=150)

# -- the command line --------------------------------------------------------------------------

# Commands fuzzed: bench measures for minutes by design, demo trains for seconds per example
# (it is in the long run only).
COMMANDS = ["train", "generate", "prepare", "viz", "explain"]
# Integer flags are fuzzed with small or invalid values only, so that an example cannot ask for
# hours of training (that would be a valid request); those whose defaults mean minutes of work
# are always given.
_SIZES = ["-1", "0", "1", "2", "nan", "x", "2.5"]
_WORK = {"--steps": ["1", "2", "1", "0", "-1"], "--max-new-tokens": ["1", "3", "0", "-1"],
         "--eval-batches": ["1", "2", "0"], "--generate": ["0", "2", "-1"],
         "--batch-size": ["1", "2", "4", "0"]}
# Flags left alone: presets pick models of up to 1.5B parameters (a valid, slow request).
_FIXED = {"--preset", "--resume", "--help", "-h"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Paths the fuzzer may pass: a model, a corpus, a text file, a FIFO, a missing path."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", n_layer=1, n_head=2, n_embd=16, context=32)).save_pretrained(
        root / "model")
    (root / "text.txt").write_text("the cat sat on the mat\n" * 3000)  # has validation blocks
    assert main(["prepare", "--input", str(root / "text.txt"), "--out", str(root / "corpus"),
                 "--no-progress"]) == 0
    os.mkfifo(root / "fifo")
    return {"model": str(root / "model"), "corpus": str(root / "corpus"),
            "text": str(root / "text.txt"), "fifo": str(root / "fifo"),
            "missing": str(root / "missing"), "root": str(root)}


def _values(world: dict[str, str]) -> st.SearchStrategy[str]:
    nasty = ["0", "-1", "1", "2", "3", "nan", "inf", "-inf", "1e-40", "1e308", "-0.001",
             str(2**64), "", " ", "x", "é", "0x10", "1,2,3", "a,b", "causal", "window:0",
             "window:3", "prefix:2", "documents", "none"]
    return st.sampled_from(nasty + list(world.values()))


@st.composite
def argvs(draw, world: dict[str, str], commands: list[str]) -> list[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = draw(st.sampled_from(commands))
    sub = subparsers.choices[command]
    argv = [command]
    for action in sub._actions:
        if not action.option_strings:  # a positional: always given
            argv.append(draw(_values(world)))
            continue
        flag = action.option_strings[-1]
        if flag in _WORK:
            argv += [flag, draw(st.sampled_from(_WORK[flag]))]
            continue
        if flag in _FIXED or not (action.required or draw(st.integers(0, 3)) == 0):
            continue
        if action.nargs == 0:
            argv.append(draw(st.sampled_from(action.option_strings)))
        elif action.choices is not None and draw(st.booleans()):
            argv += [flag, str(draw(st.sampled_from(list(action.choices))))]
        elif action.type is int and "seed" not in flag:
            argv += [flag, draw(st.sampled_from(_SIZES))]
        else:
            argv += [flag, draw(_values(world))]
    if command in ("train", "prepare", "viz", "demo") and "--no-progress" in \
            {s for a in sub._actions for s in a.option_strings}:
        argv.append("--no-progress")
    if draw(st.integers(0, 9)) == 0:  # a misspelled flag now and then
        argv.append("--" + draw(st.sampled_from(["stpes", "lr-min", "tokenzier", "outt"])))
    return argv


@contextlib.contextmanager
def _inside(directory: str):
    # contextlib.chdir exists from Python 3.11 on only.
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def _run_cli(argv: list[str]) -> None:
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as cwd, _inside(cwd), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as stop:  # argparse: --help or a usage error
            assert stop.code in (0, 2), (argv, stop.code, err.getvalue())
            return
    text = err.getvalue()
    assert status in (0, 1, 2), (argv, status, text)
    assert "Traceback" not in text, (argv, text)
    if status:
        lines = [ln for ln in text.splitlines() if ln.startswith("maskedattn ")]
        assert len(lines) == 1 and ": error: " in lines[0], (argv, text)


def test_cli_fuzz(world) -> None:
    @QUICK_CLI
    @given(argvs(world, COMMANDS))
    def check(argv):
        _run_cli(argv)

    check()


@pytest.mark.slow
def test_cli_fuzz_long(world) -> None:
    @LONG_CLI
    @given(argvs(world, [*COMMANDS, "demo"]))
    def check(argv):
        _run_cli(argv)

    check()


# -- attention() -------------------------------------------------------------------------------


def _oracle(q, k, v, spec, scale, softcap):
    """Masked softmax attention in float64, each mask written as its definition."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    group = hq // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    s = (q.double() @ k64.transpose(-1, -2)) * (1 / math.sqrt(d) if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(tq)[:, None] + (tk - tq)  # queries are aligned to the end of the keys
    kpos = torch.arange(tk)[None, :]
    visible = torch.ones(b, hq, tq, tk, dtype=torch.bool)
    for kind, arg in spec:
        if kind == "causal":
            visible &= kpos <= qpos
        elif kind == "window":
            visible &= (kpos <= qpos) & (kpos > qpos - arg)
        elif kind == "prefix":
            visible &= (kpos <= qpos) | (kpos < arg)
        elif kind == "padding":
            visible &= kpos[None, None] < torch.tensor(arg)[:, None, None, None]
        elif kind == "documents":
            ids = torch.tensor(arg)  # (B, Tk)
            same = ids[:, qpos[:, 0]][:, :, None] == ids[:, None, :]  # (B, Tq, Tk)
            visible &= same[:, None]
        elif kind == "dense":
            visible &= arg
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row that sees nothing: all zeros
    return p @ v64


@st.composite
def attention_calls(draw):
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    tk = draw(st.integers(1, 70))
    tq = draw(st.integers(1, tk))
    d = draw(st.sampled_from([1, 3, 8, 16, 33, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    spec, masks = [], []
    for kind in draw(st.lists(st.sampled_from(["causal", "window", "prefix", "padding",
                                               "documents", "dense"]), max_size=3)):
        if kind == "causal":
            spec.append((kind, None))
            masks.append(Causal())
        elif kind == "window":
            w = draw(st.integers(1, tk + 2))
            spec.append((kind, w))
            masks.append(SlidingWindow(w))
        elif kind == "prefix":
            n = draw(st.integers(0, tk + 2))
            spec.append((kind, n))
            masks.append(PrefixLM(n))
        elif kind == "padding":
            lengths = draw(st.lists(st.integers(0, tk), min_size=b, max_size=b))
            spec.append((kind, lengths))
            masks.append(Padding(lengths))
        elif kind == "documents":
            ids = [sorted(draw(st.lists(st.integers(0, 3), min_size=tk, max_size=tk)))
                   for _ in range(b)]
            spec.append((kind, ids))
            masks.append(Documents(ids))
        else:
            seed = draw(st.integers(0, 2**31))
            dense = torch.rand(tq, tk, generator=torch.Generator().manual_seed(seed)) < 0.7
            spec.append((kind, dense))
            masks.append(DenseMask(dense))
    mask = None
    for m in masks:
        mask = m if mask is None else mask & m
    scale = draw(st.one_of(st.none(), st.floats(0.01, 3.0)))
    softcap = draw(st.one_of(st.none(), st.floats(0.5, 50.0)))
    backend = draw(st.sampled_from(["auto", "reference", "tiled", "sdpa"]))
    seed = draw(st.integers(0, 2**31))
    return dict(b=b, hq=hkv * group, hkv=hkv, tq=tq, tk=tk, d=d, dtype=dtype, spec=spec,
                mask=mask, scale=scale, softcap=softcap, backend=backend, seed=seed)


def _check_attention(c) -> None:
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["b"], c["hq"], c["tq"], c["d"], generator=g, dtype=torch.float64)
    k = torch.randn(c["b"], c["hkv"], c["tk"], c["d"], generator=g, dtype=torch.float64)
    v = torch.randn(c["b"], c["hkv"], c["tk"], c["d"], generator=g, dtype=torch.float64)
    q, k, v = (t.to(c["dtype"]).requires_grad_() for t in (q, k, v))
    try:
        out = ma.attention(q, k, v, c["mask"], scale=c["scale"], softcap=c["softcap"],
                           backend=c["backend"])
    except ValueError as err:  # an explicit backend may decline, and say why
        assert "cannot serve" in str(err), err
        return
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _oracle(q64, k64, v64, c["spec"], c["scale"], c["softcap"])
    tol = dict(rtol=1e-9, atol=1e-9) if c["dtype"] == torch.float64 else dict(rtol=2e-4,
                                                                              atol=2e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    grad_tol = dict(rtol=1e-8, atol=1e-8) if c["dtype"] == torch.float64 else dict(rtol=1e-3,
                                                                                   atol=2e-4)
    for mine, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **grad_tol)


def test_attention_fuzz() -> None:
    @QUICK
    @given(attention_calls())
    def check(call):
        _check_attention(call)

    check()


@pytest.mark.slow
def test_attention_fuzz_long() -> None:
    @LONG
    @given(attention_calls())
    def check(call):
        _check_attention(call)

    check()


def test_fuzzer_oracle_agrees_with_sdpa() -> None:
    # The oracle itself, against torch's own attention on a plain causal call.
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(_oracle(q, k, v, [("causal", None)], None, None), expected)
