"""Context parallelism, FSDP2 and resuming on another number of processes, in real torchrun jobs.

Every run trains the same tiny RoPE model on the same global batches; the losses must match the
one-process run's within float32 rounding (rel 1e-5): the parallel runs add the same terms in
another order (ring attention merges partial softmaxes; gradients are summed across ranks).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskedattn.model import GPT, GPTConfig
from maskedattn.train import parallel
from tests.distributed import run_ranks
from tests.train.test_train import TINY_FLAGS, cli, losses, quiet_env

ARGS = ["--task", "induction", "--task-size", "8", *TINY_FLAGS, "--positions", "rope",
        "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
        "--log-every", "1", "--warmup", "2"]


def torchrun(n: int, *args: str, timeout: float = 180) -> None:
    # --standalone: the agent's store binds a port the OS picks and the ranks share it, so runs
    # in parallel test workers cannot race for a port found free a moment earlier; the ranks
    # reach it at 127.0.0.1 rather than at whatever this host's name resolves to.
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--local-addr=127.0.0.1", f"--nproc_per_node={n}"]
    done = subprocess.run([*launch, "-m", "maskedattn", "train", "--no-progress", *args],
                          env=quiet_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        pytest.fail(f"torchrun exited {done.returncode}:\n{done.stderr[-6000:]}")


def assert_same_losses(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a[step], b[step])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(cli(*ARGS, "--out", str(out)), check=True, env=quiet_env(), timeout=120)
    return out


def val_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r}


def test_context_parallel_equals_one_process_and_resumes_on_one(straight, tmp_path) -> None:
    cp = tmp_path / "cp"
    # Two micro-batches as well: DDP's no_sync on the first (the same global batch).
    torchrun(2, *ARGS, "--context-parallel", "2", "--grad-accum", "2", "--out", str(cp))
    assert_same_losses(losses(cp), losses(straight), [1, 2, 3, 4])
    assert_same_losses(val_losses(cp), val_losses(straight), [2, 4])  # evaluated by the ring
    # The same checkpoint format: from_pretrained reads it, weights equal the one-process run's.
    ours, theirs = (GPT.from_pretrained(d / "step-000004") for d in (cp, straight))
    for (name, p), q in zip(ours.state_dict().items(), theirs.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    state = json.loads((cp / "step-000004" / "trainer_state.json").read_text())
    assert state["train_config"]["context_parallel"] == 2
    # 2 -> 1: the run written by two processes continues on one.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(cp / "step-000002", resumed / "step-000002")
    subprocess.run(cli("--resume", str(resumed)), check=True, env=quiet_env(), timeout=120)
    assert sorted(losses(resumed)) == [3, 4]
    assert_same_losses(losses(resumed), losses(straight), [3, 4])


def _whole_logits(rank, world):
    torch.manual_seed(0)  # the same model on every rank
    model = GPT(GPTConfig.preset("tiny", n_layer=2, context=32, positions="rope")).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 13))  # padded to 16 in the ring
    documents = torch.tensor([[0] * 5 + [1] * 8, [0] * 13])
    ring_calls = []
    real = parallel.ring_attention

    def counted(*args, **kwargs):
        ring_calls.append(1)
        return real(*args, **kwargs)

    parallel.ring_attention = counted
    try:
        got = parallel.ContextParallel(model, None).whole_logits(tokens, documents=documents)
    finally:
        parallel.ring_attention = real
    assert len(ring_calls) == model.config.n_layer  # every layer's attention went round the ring
    with torch.no_grad():
        want = model(tokens, documents=documents).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_context_parallel_evaluation_uses_the_ring() -> None:
    """What validation runs under --context-parallel: every position's logits, each rank's part
    through the ring, equal to one process's."""
    run_ranks(_whole_logits, 2)


def test_fsdp_resumes_one_process_run_on_two(straight, tmp_path) -> None:
    # 1 -> 2, sharded: the full checkpoint is scattered into FSDP2 shards (DCP state dicts).
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "step-000002", resumed / "step-000002")
    torchrun(2, "--resume", str(resumed), "--fsdp")
    assert sorted(losses(resumed)) == [3, 4]
    assert_same_losses(losses(resumed), losses(straight), [3, 4])
    # Gathered back to one file set at the end, readable by one process.
    GPT.from_pretrained(resumed / "step-000004")


@pytest.mark.slow
def test_data_times_context_parallel_with_fsdp(straight, tmp_path) -> None:
    grid = tmp_path / "grid"
    torchrun(4, *ARGS, "--context-parallel", "2", "--fsdp", "--out", str(grid), timeout=400)
    assert_same_losses(losses(grid), losses(straight), [1, 2, 3, 4])


@pytest.mark.slow
def test_learned_positions_context_parallel(tmp_path) -> None:
    args = [a if a != "rope" else "learned" for a in ARGS]
    one, cp = tmp_path / "one", tmp_path / "cp"
    subprocess.run(cli(*args, "--out", str(one)), check=True, env=quiet_env(), timeout=120)
    torchrun(2, *args, "--context-parallel", "2", "--out", str(cp))
    assert_same_losses(losses(cp), losses(one), [1, 2, 3, 4])
