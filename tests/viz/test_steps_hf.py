"""The steps, attribution and ablation on ``transformers`` models with random weights: the steps
redone from the weights reproduce the HF attention module's own output."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskedattn.viz import ablate_heads, direct_logit_attribution, model_steps  # noqa: E402
from maskedattn.viz.steps import adapter_for  # noqa: E402


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).eval()


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      attention_bias=True, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


MODELS = {"gpt2": (gpt2, "attn", "c_proj"), "llama": (llama, "self_attn", "o_proj")}


def blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_steps_reproduce_the_hf_attention_output(name) -> None:
    make, attn, _ = MODELS[name]
    model = make()
    with torch.no_grad():  # random biases, so a forgotten one shows
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.3)
    ids = torch.randint(0, 101, (13,), generator=torch.Generator().manual_seed(0))
    outs = []
    hooks = [getattr(b, attn).register_forward_hook(lambda m, a, o: outs.append(o[0][0]))
             for b in blocks(model)]
    steps, logits = model_steps(model, ids)
    for h in hooks:
        h.remove()
    assert adapter_for(model).positions_kind == ("learned" if name == "gpt2" else "rope")
    for s, out in zip(steps, outs, strict=True):
        torch.testing.assert_close(s.projected.float(), out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model(ids[None]).logits[0])
    effects = direct_logit_attribution(model, ids)
    assert effects.effects.shape == (2, 4, 13) and torch.isfinite(effects.effects).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_ablation_equals_zeroing_the_output_projection(name) -> None:
    make, attn, proj = MODELS[name]
    model, edited = make(), make()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ablate_heads(model, [(1, 3)]):
        ablated = model(ids).logits
    with torch.no_grad():
        w = getattr(getattr(blocks(edited)[1], attn), proj).weight
        # Conv1D (GPT-2) stores (in, out): the head's rows; nn.Linear (out, in): its columns.
        if name == "gpt2":
            w[24:32] = 0
        else:
            w[:, 24:32] = 0
        torch.testing.assert_close(ablated, edited(ids).logits)


def test_unknown_layouts_are_refused() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    with pytest.raises(TypeError, match="no attention adapter knows a BertModel"):
        adapter_for(transformers.BertModel(config))
