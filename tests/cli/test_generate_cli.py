"""``maskedattn generate``: tokenise with the saved tokenizer or bytes, sample, print."""

import pytest
import torch

from maskedattn.cli.main import main
from maskedattn.data.tokenizer import ByteTokenizer
from maskedattn.generate import generate
from maskedattn.model import GPT, GPTConfig
from tests.data.test_tokenizer import hf_bpe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", n_layer=1, context=64)).save_pretrained(path)
    return path


def test_greedy_continuation_with_bytes(model_dir, capsysbinary):
    # The exact bytes come out, those that are not UTF-8 included (no U+FFFD in their place).
    assert main(["generate", "--model", str(model_dir), "--prompt", "Hi",
                 "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out = capsysbinary.readouterr().out
    model = GPT.from_pretrained(model_dir)
    new = generate(model, [list(b"Hi")], 6, temperature=0)[0]
    assert out == ByteTokenizer().decode_bytes(list(b"Hi") + new) + b"\n"


def test_stream_prints_the_same_text(model_dir, capsysbinary):
    args = ["generate", "--model", str(model_dir), "--prompt", "Grüße", "--max-new-tokens", "8",
            "--seed", "3", "--top-k", "50", "--top-p", "0.9", "--repetition-penalty", "1.2"]
    main(args)
    plain = capsysbinary.readouterr().out
    main([*args, "--stream"])
    assert capsysbinary.readouterr().out == plain
    main([*args, "--compile"])  # decoding through torch.compile: the same tokens
    assert capsysbinary.readouterr().out == plain


def test_uses_the_tokenizer_json_beside_the_model(tmp_path, capsys):
    tok = hf_bpe()
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", n_layer=1, vocab_size=tok.vocab_size)).save_pretrained(tmp_path)
    tok.save(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "the cat",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    model = GPT.from_pretrained(tmp_path)
    new = generate(model, [tok.encode("the cat")], 4, temperature=0)[0]
    assert capsys.readouterr().out == tok.decode(tok.encode("the cat") + new) + "\n"


def test_errors_are_one_line_messages(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir / "nope"), "--prompt", "x"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x" * 60,
                 "--max-new-tokens", "10"]) == 2
    assert "beyond the model's context of 64" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", ""]) == 2
    assert "no tokens" in capsys.readouterr().err
