"""Exact parity with transformers' GPT-2 on identical weights, import and export."""

import json

import pytest
import torch

from maskedattn.generate import generate
from maskedattn.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

# Odd widths and head counts, 1 to 4 layers, tied and untied, an explicit MLP width, the exact
# (erf) GELU as well as GPT-2's tanh form.
HF_CONFIGS = [
    dict(n_embd=60, n_head=5, n_layer=1, vocab_size=101, n_positions=64),
    dict(n_embd=33, n_head=3, n_layer=2, vocab_size=97, n_positions=80),
    dict(n_embd=56, n_head=7, n_layer=3, vocab_size=131, n_positions=72, n_inner=70),
    dict(n_embd=48, n_head=1, n_layer=4, vocab_size=89, n_positions=64,
         tie_word_embeddings=False),
    dict(n_embd=40, n_head=4, n_layer=2, vocab_size=83, n_positions=64,
         activation_function="gelu"),
]


def hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    # No end-of-text token: transformers would never pick it before min_new_tokens, we would.
    config = transformers.GPT2Config(**kw, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    # Its default init leaves biases at 0 and LayerNorms at 1: randomise everything.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.mean() == 1 else 0))
    return model


def ids(vocab, b=2, t=21, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=range(len(HF_CONFIGS)), ids=lambda i: f"cfg{i}")
def pair(request, tmp_path):
    kw = HF_CONFIGS[request.param]
    theirs = hf_model(**kw)
    theirs.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf")
    return ours, theirs, kw, tmp_path


def test_logits_match_transformers(pair):
    ours, theirs, kw, _ = pair
    x = ids(kw["vocab_size"])
    with torch.no_grad():
        diff = (ours(x).logits - theirs(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_cached_logits_match_transformers(pair):
    ours, theirs, kw, _ = pair
    x = ids(kw["vocab_size"])
    with torch.no_grad():
        expected = theirs(x).logits
        cache = ours.new_cache(2, 32)
        steps = [ours(x[:, :9], cache=cache).logits]
        for t in range(9, x.shape[1]):
            steps.append(ours(x[:, t : t + 1], cache=cache, start=torch.tensor([t, t])).logits)
    assert (torch.cat(steps, 1) - expected).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(pair):
    ours, theirs, kw, _ = pair
    prompt = ids(kw["vocab_size"], b=1, t=7, seed=3)
    with torch.no_grad():
        expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=32, do_sample=False,
                                   pad_token_id=0)[0, 7:].tolist()
    assert len(expected) == 32
    assert generate(ours, prompt, 32, temperature=0)[0] == expected


def test_export_loads_in_transformers_with_identical_logits(pair):
    ours, theirs, kw, tmp_path = pair
    ours.save_pretrained(tmp_path / "export", format="transformers")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    x = ids(kw["vocab_size"])
    with torch.no_grad():
        assert torch.equal(again(x).logits, theirs(x).logits)  # same weights, same code
        assert (again(x).logits - ours(x).logits).abs().max().item() <= 1e-4


def test_our_round_trip_is_bit_exact(pair):
    ours, _, kw, tmp_path = pair
    ours.save_pretrained(tmp_path / "ours")
    back = GPT.from_pretrained(tmp_path / "ours")
    assert back.config == ours.config
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "config.json", "model.safetensors"]
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    x = ids(kw["vocab_size"])
    with torch.no_grad():
        assert torch.equal(back(x).logits, ours(x).logits)
    assert (back.lm_head.weight is back.wte.weight) == back.config.tie_weights


def test_original_gpt2_layout_loads(tmp_path):
    """The released GPT-2 files lack the ``transformer.`` prefix and hold mask buffers."""
    from safetensors.torch import load_file, save_file

    theirs = hf_model(**HF_CONFIGS[0])
    theirs.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    old["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = GPT.from_pretrained(tmp_path)
    x = ids(101)
    with torch.no_grad():
        assert (ours(x).logits - theirs(x).logits).abs().max().item() <= 1e-4


def test_dtype_and_bfloat16_round_trip(tmp_path):
    model = GPT(GPTConfig.preset("tiny", n_layer=1)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert GPT.from_pretrained(tmp_path).wte.weight.dtype == torch.bfloat16
    as_float = GPT.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_float.wte.weight.dtype == torch.float32
    assert torch.equal(as_float.wte.weight.bfloat16(), model.wte.weight)


def test_models_gpt2_cannot_hold_refuse_to_export(tmp_path):
    # llama-style models export as Llama (tests/model/test_hf_llama.py); a GELU one has no format
    model = GPT(GPTConfig.preset("llama-style", n_layer=1, vocab_size=64, mlp="gelu"))
    with pytest.raises(ValueError, match=r"positions='rope'.*norm='rmsnorm'"):
        model.save_pretrained(tmp_path, format="transformers")
    with pytest.raises(ValueError, match="format must be"):
        model.save_pretrained(tmp_path, format="onnx")


@pytest.mark.parametrize(("change", "match"), [
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_gpt2_options_are_named(tmp_path, change, match):
    hf_model(**HF_CONFIGS[0]).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(ValueError, match=match):
        GPT.from_pretrained(tmp_path)
