"""``maskedattn viz --run DIR``: the newest checkpoint drawn, and a step slider page over every
kept checkpoint on the same tokens."""

from __future__ import annotations

import json
import re

import torch

from maskedattn.cli._run_steps import step_caption
from maskedattn.cli.main import main
from maskedattn.model import GPT
from maskedattn.train import checkpoint as ckpt
from maskedattn.viz import head_scores
from maskedattn.viz.capture import capture_attention


def test_viz_run_writes_a_slider_over_the_checkpoints(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "induction", "--task-size", "4", "--context", "16",
                 "--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--vocab-size", "32",
                 "--batch-size", "4", "--eval-batches", "1", "--warmup", "1", "--steps", "4",
                 "--eval-every", "2", "--keep", "2", "--no-progress", "--out", str(run)]) == 0
    out = tmp_path / "viz"
    ids = [3, 7, 1, 3, 7, 1]
    assert main(["viz", "--run", str(run), "--ids", ",".join(map(str, ids)),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attention-steps.html" in printed
    page = (out / "attention-steps.html").read_text()
    entries = json.loads(re.search(r'<script type="application/json" id="steps">(.*?)</script>',
                                   page, re.S)[1])
    assert [e["step"] for e in entries] == [2, 4]
    assert entries[0]["caption"].startswith("step 2 · val_loss ")
    assert "accuracy" in entries[0]["caption"]
    # Each step's page holds that checkpoint's own head scores on the same tokens.
    for entry, directory in zip(entries, ckpt.list_checkpoints(run), strict=True):
        model = GPT.from_pretrained(directory).eval()
        with torch.no_grad(), capture_attention(model) as cap:
            model(torch.tensor([ids]))
        scores = head_scores(cap.maps([str(i) for i in ids], token_ids=ids)).to_dict()
        meta = json.loads(re.search(r'<script type="application/json" id="meta">(.*?)</script>',
                                    entry["page"], re.S)[1])
        assert meta["scores"]["scores"]["previous_token"] == \
            scores["scores"]["previous_token"]
    # The newest checkpoint is drawn as --model would draw it.
    assert (out / "attention.html").is_file() and (out / "attention-grid.png").is_file()


def test_viz_run_errors(tmp_path, capsys) -> None:
    assert main(["viz", "--run", str(tmp_path), "--ids", "1,2"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["viz", "--ids", "1,2"]) == 2
    assert "--model DIR" in capsys.readouterr().err
    assert main(["viz", "--model", "a", "--run", "b", "--ids", "1,2"]) == 2


def test_step_caption_without_metrics(tmp_path) -> None:
    (tmp_path / ckpt.TRAINER_STATE).write_text(json.dumps({"step": 7}))
    assert step_caption(tmp_path) == (7, "step 7")
