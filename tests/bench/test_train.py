"""The training benchmark runs end to end (a small model; timings are not checked)."""

import platform
import subprocess
import sys

import pytest
import torch

from maskedattn._errors import Failure
from maskedattn.bench import train
from maskedattn.cli.main import main
from maskedattn.model import GPT, GPTConfig

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context", "16", "--batch", "2",
         "--repeats", "1", "--warmup", "0"]


def test_quick_run_against_plain_gpt(capsys, monkeypatch):
    monkeypatch.delenv("MASKEDATTN_NANOGPT", raising=False)
    assert main(["bench", "train", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "PlainGPT (SDPA)" in out and "throughput ratio maskedattn / PlainGPT (SDPA)" in out


def test_a_step_on_non_finite_weights_stops_the_benchmark(monkeypatch):
    # Timing steps that train on NaN measures nothing: a compiled bfloat16 step once broke the
    # weights on its first step and the table still printed a speed-up.
    def poisoned(config):
        return "maskedattn", GPT(config), lambda m, x, y: m(x, y).loss * float("nan")

    monkeypatch.setattr(train, "_ours", poisoned)
    config = GPTConfig.preset("tiny", n_layer=1, n_head=2, n_embd=32, context=16)
    with pytest.raises(Failure, match=r"loss of step 1 .*is nan"):
        train.measure(config, 2, torch.float32, repeats=1, warmup=1)


def test_missing_nanogpt_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"nanoGPT's model\.py"):
        main(["bench", "train", *SMALL, "--nanogpt", str(tmp_path / "model.py")])


@pytest.mark.slow
def test_compiled_run_counts_graph_breaks(capsys, monkeypatch):
    monkeypatch.delenv("MASKEDATTN_NANOGPT", raising=False)
    assert main(["bench", "train", *SMALL, "--compile"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile of maskedattn:" in out and "graph break(s)" in out
    assert "maskedattn eager" in out and "PlainGPT (SDPA) compiled" in out


def test_each_model_in_processes_of_its_own(capsys, monkeypatch):
    monkeypatch.delenv("MASKEDATTN_NANOGPT", raising=False)
    assert main(["bench", "train", *SMALL, "--processes", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "in each of 1 processes per model" in out
    assert "throughput ratio maskedattn / PlainGPT (SDPA)" in out


def test_processes_with_compile_is_refused():
    with pytest.raises(SystemExit):
        main(["bench", "train", *SMALL, "--processes", "1", "--compile"])


def test_each_process_keeps_its_heap_when_asked(capsys, monkeypatch):
    monkeypatch.delenv("MASKEDATTN_NANOGPT", raising=False)
    assert main(["bench", "train", *SMALL, "--processes", "1", "--heap", "keep"]) == 0
    assert "keep heap" in capsys.readouterr().out


_REUSE = """
import ctypes, resource, sys
from maskedattn.bench.train import keep_heap
if sys.argv[1] == "keep":
    keep_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(20 << 20) for _ in range(2)]
    for b in blocks:
        ctypes.memset(b, 1, 20 << 20)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_a_kept_heap_reuses_freed_memory_without_faults():
    # Two 20 MiB blocks freed: glibc hands them back (the next use faults every page in
    # again) unless told to keep them.
    def last_faults(heap: str) -> int:
        run = subprocess.run([sys.executable, "-c", _REUSE, heap], capture_output=True,
                             text=True, check=True)
        return int(run.stdout)

    assert last_faults("system") > 5000
    assert last_faults("keep") < 100
