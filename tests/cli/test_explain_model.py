"""``explain --model`` and ``ablate --text`` on a saved byte-level model with learned positions
(GPT-2's layout), its tokenizer beside it."""

from __future__ import annotations

import json

import pytest
import torch

from maskedattn.cli.main import main
from maskedattn.data.tokenizer import ByteTokenizer
from maskedattn.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes-model")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", n_layer=2, n_head=2, n_embd=32, context=64)).save_pretrained(path)
    ByteTokenizer().save(path)
    return path


def test_explain_model_text_layer_head_token(model_dir, capsys) -> None:
    assert main(["explain", "--model", str(model_dir), "--text", "to be or", "--layer", "0",
                 "--head", "1", "--token", "3"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert out.startswith("8 tokens: t | o | ␣ | b | e | ␣ | o | r")
    assert "layer 0 of 2" in flat and "showing head 1" in flat
    assert "Q = X·Wq + b" in flat  # GPT-2's layout has biases
    assert "Step 1b - positions: this model adds a learned position vector" in flat
    assert "[head 1, Q, dims 0-9 of 16]" in out and "[X, dims 0-9 of 32]" in out
    assert "One row worked through: query 3 'b', head 1" in flat
    # Four keys are visible to query 3, four are hidden.
    worked = out.split("One row worked through")[1].split("Output of the head")[0]
    assert worked.count("hidden by the mask") == 4


def test_explain_model_json_has_every_step(model_dir, capsys) -> None:
    assert main(["explain", "--model", str(model_dir), "--text", "abcab", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["positions"] == "learned" and data["heads"] == 2 and data["head_dim"] == 16
    assert len(data["x"]) == 5 and len(data["x"][0]) == 32
    assert len(data["scores"]) == 2 and data["masked"][0][0][1] is None
    assert len(data["output"][0]) == 32


def test_explain_model_errors(model_dir, capsys) -> None:
    assert main(["explain", "--model", str(model_dir)]) == 2
    assert "needs a text" in capsys.readouterr().err
    assert main(["explain", "--model", str(model_dir), "--text", "ab", "--layer", "2"]) == 2
    assert "--layer 2 is out of range" in capsys.readouterr().err
    assert main(["explain", "a b", "--layer", "1"]) == 2
    assert "need --model" in capsys.readouterr().err


def test_ablate_on_a_text(model_dir, capsys) -> None:
    assert main(["ablate", "--model", str(model_dir), "--text", "hello hello", "--how", "mean",
                 "--heads", "0:0", "1:1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "the text, 11 tokens" in lines[0] and "(mean)" in lines[0]
    assert [line.split()[0] for line in lines[3:]] == ["L0H0", "L1H1"]
    assert main(["ablate", "--model", str(model_dir), "--text", "h"]) == 2
    assert "at least two tokens" in capsys.readouterr().err
