"""Every benchmark refuses a count it cannot run with before it starts, in argparse's words."""

from __future__ import annotations

import pytest

from maskedattn.bench import attention, attention_gpu, gelu, generate, hf, train

CASES = [
    (generate, ["--prefill", "0"], "--prefill: must be at least 1, got 0"),  # was a KVCache error
    (generate, ["--repeats", "-1"], "--repeats: must be at least 1, got -1"),
    (generate, ["--sample", "0"], "--sample: must be a number above 0, got '0'"),
    (train, ["--repeats", "0"], "--repeats: must be at least 1, got 0"),  # was "no median"
    (train, ["--warmup", "-1"], "--warmup: must be at least 0, got -1"),
    (train, ["--batch", "two"], "--batch: an integer is expected, got 'two'"),
    (attention, ["--t", "64", "0"], "--t: must be at least 1, got 0"),
    (attention_gpu, ["--rep-ms", "0"], "--rep-ms: must be at least 1, got 0"),
    (gelu, ["--rows", "0"], "--rows: must be at least 1, got 0"),
    (hf, ["--new", "0"], "--new: must be at least 1, got 0"),
]


@pytest.mark.parametrize(("bench", "argv", "message"), CASES,
                         ids=[f"{b.__name__.rsplit('.', 1)[1]}{a[0]}" for b, a, _ in CASES])
def test_a_bad_count_is_a_usage_error(bench, argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        bench.main(argv)
    assert exit.value.code == 2
    assert f"argument {message}" in capsys.readouterr().err
