"""--track-heads: every head's role scores on a fixed probe at each evaluation, the heads.png
picture, and the phase change found in the records."""

from __future__ import annotations

import json

import pytest
import torch

from maskedattn.model import GPT, GPTConfig
from maskedattn.train.config import TrainConfig
from maskedattn.train.heads_track import probe_tokens, track_heads
from maskedattn.train.loop import train
from maskedattn.train.report import phase_change, plot_heads
from maskedattn.viz import ROLES, head_scores
from maskedattn.viz.capture import capture_attention

TINY = (("context", 16), ("n_embd", 16), ("n_head", 2), ("n_layer", 2), ("vocab_size", 32))


def test_probe_is_a_fixed_repeated_random_sequence() -> None:
    p = probe_tokens(50, 21, seed=3)
    assert p.shape == (4, 20) and p.dtype == torch.long
    assert torch.equal(p[:, :10], p[:, 10:])
    assert all(len(set(row[:10].tolist())) == 10 for row in p)  # distinct within a copy
    assert torch.equal(p, probe_tokens(50, 21, seed=3))
    assert not torch.equal(p, probe_tokens(50, 21, seed=4))
    assert probe_tokens(50, 40, seed=0, half=6).shape == (4, 12)
    assert probe_tokens(5, 40, seed=0).shape == (4, 10)  # no more distinct tokens than exist
    with pytest.raises(ValueError, match="at least 4 tokens"):
        probe_tokens(50, 3, seed=0)


def test_scores_are_the_mean_of_head_scores_over_the_probe() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", **dict(TINY)))
    model.train()
    probe = probe_tokens(32, 16, seed=0)
    scores = track_heads(model, probe)
    assert model.training  # the mode is restored
    assert set(scores) == set(ROLES)
    expected = []
    model.eval()
    for row in probe:
        with torch.no_grad(), capture_attention(model) as cap:
            model(row[None])
        ids = row.tolist()
        expected.append(head_scores(cap.maps([str(i) for i in ids], token_ids=ids))
                        .scores["induction"])
    mean = torch.stack(expected).mean(0)
    assert torch.tensor(scores["induction"]) == pytest.approx(mean, abs=1e-4)
    assert track_heads(model, probe) == scores  # deterministic


def test_train_records_heads_at_each_evaluation(tmp_path) -> None:
    config = TrainConfig(out=str(tmp_path), task="induction", task_size=4, model=TINY, steps=4,
                         batch_size=4, eval_every=2, eval_batches=1, warmup=1, log_every=1,
                         track_heads=True)
    train(config, progress=False)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("heads" not in r for r in records if "val_loss" not in r)
    for r in evals:
        assert set(r["heads"]) == set(ROLES)
        grid = r["heads"]["previous_token"]
        assert len(grid) == 2 and all(len(row) == 2 for row in grid)
        assert all(0 <= x <= 1 for row in grid for x in row)
    assert (tmp_path / "heads.png").read_bytes()[:4] == b"\x89PNG"


def synthetic(scores: list[float]) -> list[dict]:
    """Records of a run whose layer 1 head 0 becomes an induction head."""
    out = []
    for i, s in enumerate(scores):
        step = 10 * (i + 1)
        out.append({"step": step, "loss": 4.0 - 3 * s})
        out.append({"step": step, "val_loss": 4.0 - 3 * s,
                    "heads": {"induction": [[0.05, 0.02], [s, None]],
                              "previous_token": [[0.9, 0.1], [0.1, 0.1]]}})
    return out


def test_phase_change_and_its_picture(tmp_path) -> None:
    records = synthetic([0.01, 0.02, 0.1, 0.55, 0.8, 0.9])
    assert phase_change(records) == {"step": 40, "before": 30, "layer": 1, "head": 0,
                                     "score": 0.55}
    assert phase_change(synthetic([0.01, 0.2])) is None
    assert phase_change(synthetic([0.7]))["before"] is None
    assert plot_heads(records, tmp_path / "heads.png")
    assert (tmp_path / "heads.png").stat().st_size > 10_000
    assert not list(tmp_path.glob(".heads.png.tmp*"))
    assert not plot_heads([{"step": 1, "loss": 2.0}], tmp_path / "none.png")  # nothing tracked
