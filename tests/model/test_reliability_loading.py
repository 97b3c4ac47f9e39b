"""Bounded loading: a config.json is held against its weights file before anything is built."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from maskedattn.model import GPT, GPTConfig

SMALL = dict(vocab_size=64, context=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(params=["maskedattn", "transformers"])
def saved(request, tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", **SMALL)).save_pretrained(tmp_path, format=request.param)
    return tmp_path, request.param


def set_field(path, ours: str, theirs: str, value) -> None:
    meta = json.loads((path / "config.json").read_text())
    if "config" in meta:
        meta["config"][ours] = value
    else:
        meta[theirs] = value
    (path / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("n_layer", [100_000, 10**7])
def test_more_layers_than_the_file_holds_fail_fast(saved, n_layer) -> None:
    path, _ = saved
    set_field(path, "n_layer", "n_layer", n_layer)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"n_layer={n_layer} but .* holds 2. tensors"):
        GPT.from_pretrained(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("field, theirs, value", [
    ("vocab_size", "vocab_size", 10**9), ("n_embd", "n_embd", 2**30),
    ("context", "n_positions", 10**9),
])
def test_sizes_the_file_cannot_hold_fail_fast(saved, field, theirs, value) -> None:
    path, _ = saved
    set_field(path, field, theirs, value)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"wrong shape|must be divisible|too large for any"):
        GPT.from_pretrained(path)
    assert time.perf_counter() - start < 1.0


def test_a_deeply_nested_config_is_a_clear_error(tmp_path) -> None:
    GPT(GPTConfig.preset("tiny", **SMALL)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(norm_eps=math.inf), "norm_eps must be a positive number"),
    (dict(norm_eps=math.nan), "norm_eps must be a positive number"),
    (dict(rope_base=math.inf), "rope_base must be a positive number"),
    (dict(n_embd=10**30), "n_embd must be an integer >= 1"),
    (dict(vocab_size=2**31), "vocab_size must be an integer >= 1"),
])
def test_gptconfig_refuses_infinite_or_huge_numbers(change, match) -> None:
    with pytest.raises(ValueError, match=match):
        GPTConfig.preset("tiny", **change)


class _Planted:
    """Unpickling this creates a file: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_loading_never_unpickles(tmp_path, name) -> None:
    import pickle

    GPT(GPTConfig.preset("tiny", **SMALL)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    (tmp_path / name).write_bytes(pickle.dumps({"wte.weight": _Planted(marker)}))
    with pytest.raises((ValueError, FileNotFoundError)):
        GPT.from_pretrained(tmp_path)
    assert not marker.exists()
