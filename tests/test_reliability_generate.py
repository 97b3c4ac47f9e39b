"""generate: a tokenizer that does not fit the model is refused; sampling numbers at their
extremes are greedy or refused, never a traceback from torch."""

from __future__ import annotations

import pytest
import torch

from maskedattn.cli.main import main
from maskedattn.generate import generate
from maskedattn.model import GPT, GPTConfig
from tests.data.test_tokenizer import hf_bpe


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2 directory (transformers format) of 1000 ids, without its tokenizer.json."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=1000, context=32, n_layer=1, n_head=2, n_embd=16)).save_pretrained(
        path, format="transformers")
    return path


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", n_layer=1, n_head=2, n_embd=16, context=64)).save_pretrained(
        path)
    return path


def test_a_model_without_its_tokenizer_is_refused_at_load(gpt2_dir, capsys) -> None:
    # Before: the prompt was read as bytes (wrong ids for GPT-2), and a sampled id >= 257 crashed.
    assert main(["generate", "--model", str(gpt2_dir), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "--tokenizer PATH" in err and "--ids" in err
    assert "Traceback" not in err


def test_tokenizer_flag_and_ids(gpt2_dir, tmp_path, capsys) -> None:
    tok = hf_bpe()
    assert tok.vocab_size <= 1000
    tok.save(tmp_path)
    assert main(["generate", "--model", str(gpt2_dir), "--tokenizer",
                 str(tmp_path / "tokenizer.json"), "--prompt", "the cat", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    model = GPT.from_pretrained(gpt2_dir)
    new = generate(model, [tok.encode("the cat")], 3, temperature=0)[0]
    assert capsys.readouterr().out == tok.decode(tok.encode("the cat") + new) + "\n"
    assert main(["generate", "--model", str(gpt2_dir), "--ids", "5,900,7",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    new = generate(model, [[5, 900, 7]], 3, temperature=0)[0]
    assert capsys.readouterr().out == ",".join(map(str, [5, 900, 7, *new])) + "\n"


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(byte_dir, tmp_path, capsys) -> None:
    hf_bpe().save(tmp_path)  # more ids than the 256 of the byte model
    assert main(["generate", "--model", str(byte_dir), "--tokenizer", str(tmp_path),
                 "--prompt", "x"]) == 2
    assert "is not this model's tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [1e-40, 1e-50, 5e-324])
def test_a_tiny_temperature_is_greedy(byte_dir, temperature) -> None:
    model = GPT.from_pretrained(byte_dir)
    prompt = [list(b"abc")]
    assert generate(model, prompt, 8, temperature=temperature, seed=1) == \
        generate(model, prompt, 8, temperature=0)


@pytest.mark.parametrize("penalty", [1e-39, 1e-42, 1e39, 5e-324])
def test_extreme_repetition_penalties_sample(byte_dir, penalty) -> None:
    model = GPT.from_pretrained(byte_dir)
    # Fifty seen tokens: some have positive logits, which a tiny penalty divides into infinity
    # (before: a NaN row and a multinomial traceback).
    (row,) = generate(model, [list(range(0, 250, 5))], 6, repetition_penalty=penalty, seed=0)
    assert len(row) == 6 and all(0 <= t < 256 for t in row)


@pytest.mark.parametrize("seed", [str(2**64), str(2**63), "-1"])
def test_seed_out_of_range_is_a_usage_error(byte_dir, seed, capsys) -> None:
    assert main(["generate", "--model", str(byte_dir), "--prompt", "x", "--max-new-tokens", "4",
                 f"--seed={seed}"]) == 2
    err = capsys.readouterr().err
    assert "seed must be an integer in [0, 2**63)" in err and "Traceback" not in err
