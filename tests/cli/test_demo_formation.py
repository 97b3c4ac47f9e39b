"""The demo records how its heads formed: the induction score rises from low to high as the loss
drops (the phase change of Olsson et al. 2022), in formation.png, with a step slider page."""

from __future__ import annotations

import json

import torch

from maskedattn.cli.main import main


def test_demo_records_the_induction_head_forming(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--steps", "600", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)  # the demo sets one thread
    printed = capsys.readouterr().out
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "heads" in r]
    assert len(evals) == 24

    def best_induction(r: dict) -> float:
        return max(x for row in r["heads"]["induction"] for x in row if x is not None)

    assert best_induction(evals[0]) < 0.1  # no induction head at the start ...
    assert best_induction(evals[-1]) > 0.7  # ... a strong one at the end
    # The loss falls as it forms: the first eval at which a head reaches 0.4 comes after the
    # loss has started to fall, and the fall continues through the rest of the run.
    first = next(r for r in evals if best_induction(r) >= 0.4)
    assert evals[0]["val_loss"] > first["val_loss"] > evals[-1]["val_loss"] * 5
    assert "became an induction head at step" in printed
    assert (out / "formation.png").stat().st_size > 20_000
    page = (out / "formation.html").read_text()
    assert page.count('"step":') == 24 and "https://" not in page
