"""``--device`` on generate, viz and explain: cpu, auto, cuda; a clear error without CUDA."""

from __future__ import annotations

import pytest
import torch

from maskedattn.cli._device import resolve_device
from maskedattn.cli.main import main
from maskedattn.data.tokenizer import ByteTokenizer
from maskedattn.model import GPT, GPTConfig

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny", n_layer=1, n_head=2, n_embd=16, context=32)).save_pretrained(
        path)
    ByteTokenizer().save(path)
    return path


COMMANDS = {
    "generate": lambda m, o: ["generate", "--model", str(m), "--prompt", "ab",
                              "--max-new-tokens", "3", "--temperature", "0"],
    "viz": lambda m, o: ["viz", "--model", str(m), "--text", "abab", "--out", str(o)],
    "explain": lambda m, o: ["explain", "a b a"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cpu_and_auto_agree(command, model_dir, tmp_path, capsys) -> None:
    outputs = []
    for device in ("cpu", "auto") if NO_CUDA else ("cpu",):
        assert main([*COMMANDS[command](model_dir, tmp_path / device), "--device", device]) == 0
        outputs.append(capsys.readouterr().out.replace(str(tmp_path / device), "OUT"))
    assert len(set(outputs)) == 1


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cuda_without_cuda_is_a_clear_error(command, model_dir, tmp_path, capsys) -> None:
    assert main([*COMMANDS[command](model_dir, tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and "--device cpu" in err
    assert "Traceback" not in err


def test_device_forms() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" AUTO ").type == ("cpu" if NO_CUDA else "cuda")
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ValueError, match="cpu, cuda, cuda:N or auto"):
            resolve_device(bad)
    if NO_CUDA:
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:1")
