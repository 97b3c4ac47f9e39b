"""Llama, Qwen2 and Mistral checkpoints in our GPT: logits equal to transformers, both ways.

Models are tiny, randomly initialised by transformers and saved to temporary directories.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskedattn.model import GPT, GPTConfig  # noqa: E402
from tests.integrations.hf_tokenizer import byte_bpe  # noqa: E402

VOCAB = 101
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)

CASES = {
    "llama": lambda: transformers.LlamaConfig(**_SMALL, rope_theta=5e5),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **_SMALL, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    "linear-rope": lambda: transformers.LlamaConfig(
        **_SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}),
    "llama-bias": lambda: transformers.LlamaConfig(**_SMALL, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: transformers.Qwen2Config(**_SMALL),
    "qwen2-tied": lambda: transformers.Qwen2Config(**_SMALL, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_SMALL, sliding_window=5),
}


def _random_model(case: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CASES[case]()).eval()
    with torch.no_grad():  # random biases and norm weights, so that a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5 if "norm" not in name else 0.2).add_(
                    1.0 if "norm" in name else 0.0)
    return model


def _tokens():
    return torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(tmp_path, case):
    theirs = _random_model(case)
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    tokens = _tokens()
    with torch.no_grad():
        want = theirs(tokens).logits
        got = ours(tokens).logits
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2", "mistral"])
def test_export_round_trip(tmp_path, case):
    theirs = _random_model(case)
    theirs.save_pretrained(tmp_path / "in")
    ours = GPT.from_pretrained(tmp_path / "in").eval()
    ours.save_pretrained(tmp_path / "out", format="transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(theirs)
    tokens = _tokens()
    with torch.no_grad():
        assert (back(tokens).logits - theirs(tokens).logits).abs().max() <= 1e-5
    again = GPT.from_pretrained(tmp_path / "out")
    assert again.config == ours.config


def test_sharded_checkpoint(tmp_path):
    theirs = _random_model("qwen2")
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = GPT.from_pretrained(tmp_path).eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max() <= 1e-4


def test_llama_style_preset_exports_and_generates_like_transformers(tmp_path):
    config = GPTConfig.preset("llama-style", vocab_size=VOCAB, n_layer=2, n_embd=96, n_head=6,
                              n_kv_head=2, context=64)
    torch.manual_seed(0)
    ours = GPT(config).eval()
    ours.save_pretrained(tmp_path, format="transformers")
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens).logits).abs().max() <= 1e-4


def test_mistral_window_with_cache_matches_transformers(tmp_path):
    """Decoding past the window with our KV cache, rows of different lengths."""
    from maskedattn.generate import generate

    theirs = _random_model("mistral")
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    prompts = [[5, 9, 2, 7, 11, 3, 8, 1], [4, 6, 10]]
    got = generate(ours, prompts, 9, temperature=0)
    for prompt, tokens in zip(prompts, got, strict=True):
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False,
                               pad_token_id=0)[0, len(prompt):]
        assert tokens == want.tolist()


def test_unsupported_options_raise(tmp_path):
    config = transformers.LlamaConfig(**_SMALL, hidden_act="gelu",
                                      rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                       "rope_theta": 1e4})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"hidden_act='gelu'.*rope scaling 'dynamic'"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("preset", ["gpt2", "llama-style"])
def test_pipeline_runs_on_our_export(tmp_path, preset):
    tok = byte_bpe(300, "the cat sat on the mat. a dog ran in the park. the end.")
    vocab = tok.get_vocab_size()
    config = GPTConfig.preset(preset, vocab_size=vocab, n_layer=2, n_embd=64, n_head=4,
                              **({"n_kv_head": 2} if preset == "llama-style" else {}),
                              context=64)
    torch.manual_seed(0)
    GPT(config).save_pretrained(tmp_path, format="transformers", tokenizer=tok)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    eot = tok.token_to_id("<|endoftext|>")
    assert generation["eos_token_id"] == generation["bos_token_id"] == eot
    pipe = transformers.pipeline("text-generation", model=str(tmp_path))
    assert pipe.tokenizer.eos_token_id == eot
    out = pipe("the cat", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("the cat")
