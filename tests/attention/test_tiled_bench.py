"""The attention benchmark runs end to end (tiny sizes; speed is never asserted)."""

from __future__ import annotations

import pytest

from maskedattn.attention import native
from maskedattn.bench import attention as bench
from maskedattn.cli.main import main as cli

needs_kernel = pytest.mark.skipif(native.kernel() is None,
                                  reason="the native kernel cannot be built here")


@needs_kernel
def test_quick_run_prints_the_table(capsys):
    assert bench.main(["--quick", "--dtypes", "float32", "--passes", "fwd"]) == 0
    out = capsys.readouterr().out
    assert "tiled/sdpa" in out and "GFLOP/s" in out
    assert sum(line.strip().startswith("float32") for line in out.splitlines()) == 2


@needs_kernel
def test_cli_dispatches_to_it(capsys):
    assert cli(["bench", "attention", "--quick", "--dtypes", "bfloat16", "--passes", "fwdbwd"]) == 0
    assert "bfloat16 fwd+bwd" in capsys.readouterr().out


def test_flops_count_causal_half_and_backward():
    full = bench.attention_flops(1, 8, 1024, 1024, 64, causal=False, backward=False)
    assert full == 4 * 8 * 1024 * 1024 * 64
    assert bench.attention_flops(1, 8, 1024, 1024, 64, causal=True, backward=True) == full * 1.75


def test_the_small_call_section_prints_what_the_operator_layer_costs(capsys):
    bench.overhead()
    out = capsys.readouterr().out
    assert "operator, inputs requiring grad" in out and "us over the implementation" in out
    assert "forward + backward: ma.attention" in out
    assert "a decoding call" in out and "sdpa" in out.split("a decoding call")[1]
