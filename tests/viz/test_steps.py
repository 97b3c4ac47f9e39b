"""The five steps redone from a real model's weights reproduce what the model computed; direct logit
attribution splits the layer's output exactly; ablation equals editing the weights."""

from __future__ import annotations

import pytest
import torch

from maskedattn.model import GPT, GPTConfig
from maskedattn.viz.ablate import ablate_heads, ablation_table
from maskedattn.viz.attribution import direct_logit_attribution, head_writes
from maskedattn.viz.capture import capture_attention
from maskedattn.viz.steps import layer_steps, model_steps

CONFIGS = {
    # GPT-2's choices: learned positions, LayerNorm, biases everywhere.
    "gpt2-like": dict(n_layer=2, n_head=4, n_embd=32, vocab_size=97, context=300),
    # LLaMA's: rotary positions, RMSNorm, no biases, SwiGLU, grouped-query attention.
    "llama-like": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=97, context=300,
                       positions="rope", norm="rmsnorm", bias=False, mlp="swiglu",
                       tie_weights=False),
}


def make_model(name: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", **CONFIGS[name])).eval()
    # Random biases and gains, so a forgotten term shows up in the comparisons.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("bias", "norm1.weight", "norm.weight")):
                p.normal_(0, 0.3)
    return model


def attn_outputs(model: GPT, ids: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: outs.append(o[0])) for b in model.blocks]
    with torch.no_grad():
        model(ids[None])
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("t", [1, 13, 257])
def test_steps_reproduce_the_attention_modules_output(name, t) -> None:
    model = make_model(name)
    ids = torch.randint(0, 97, (t,), generator=torch.Generator().manual_seed(t))
    steps, logits = model_steps(model, ids)
    for s, out in zip(steps, attn_outputs(model, ids), strict=True):
        assert s.x.dtype == torch.float64 and s.x.shape == (t, 32)
        torch.testing.assert_close(s.projected.float(), out, rtol=1e-4, atol=1e-5)
        # The trace's steps are consistent with each other: scaled = raw * 1/sqrt(D), hidden -inf.
        torch.testing.assert_close(s.trace.scaled, s.trace.scores * 8 ** -0.5)
        assert torch.isinf(s.trace.masked[0, :, 0, 1:]).all()
    torch.testing.assert_close(logits, model(ids[None]).logits[0])


def test_rope_is_a_step_of_its_own_and_probabilities_match_capture() -> None:
    model = make_model("llama-like")
    ids = torch.tensor([5, 9, 5, 9, 11])
    s = layer_steps(model, ids, 1)
    assert s.positions_kind == "rope"
    # Rotation keeps each vector's length and moves q only where the position is not 0.
    torch.testing.assert_close(s.q.norm(dim=-1), s.q_raw.norm(dim=-1))
    torch.testing.assert_close(s.q[:, 0], s.q_raw[:, 0])
    assert not torch.allclose(s.q[:, 1:], s.q_raw[:, 1:])
    with torch.no_grad(), capture_attention(model, layers=[1]) as cap:
        model(ids[None])
    captured = cap.maps([str(i) for i in ids.tolist()]).probs[0]
    torch.testing.assert_close(s.trace.probs[0].float(), captured, rtol=1e-4, atol=1e-6)


def test_bad_layer_and_empty_text() -> None:
    model = make_model("gpt2-like")
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        layer_steps(model, [1, 2], 5)
    with pytest.raises(ValueError, match="no tokens"):
        model_steps(model, [])
    with pytest.raises(TypeError, match="no attention adapter"):
        model_steps(torch.nn.Linear(2, 2), [1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_head_writes_sum_to_the_layers_output_and_attribution_is_linear(name) -> None:
    model = make_model(name)
    ids = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(1))
    steps, _ = model_steps(model, ids)
    bo = model.blocks[0].attn.proj.bias
    total = head_writes(steps[0]).sum(0) + (0 if bo is None else bo.double())
    torch.testing.assert_close(total, steps[0].projected)
    effects = direct_logit_attribution(model, ids)
    assert effects.effects.shape == (2, 4, 11)
    torch.testing.assert_close(effects.targets, model(ids[None]).logits[0].argmax(-1))
    # Oracle: a head's effect is its write, normed with the full residual's scale, then
    # unembedded; for RMSNorm that is write / rms(residual) * gain, computed here by hand.
    if name == "llama-like":
        resid = []
        h = model.norm.register_forward_pre_hook(lambda m, a: resid.append(a[0][0].double()))
        with torch.no_grad():
            model(ids[None])
        h.remove()
        rms = resid[0].pow(2).mean(-1, keepdim=True).add(model.config.norm_eps).sqrt()
        write = head_writes(steps[1])[2]  # layer 1 head 2, (T, C)
        by_hand = (write / rms * model.norm.weight.double()) @ model.lm_head.weight.double().T
        expected = by_hand[torch.arange(11), effects.targets]
        torch.testing.assert_close(effects.effects[1, 2], expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_ablation_equals_zeroing_the_heads_rows_of_wo(name) -> None:
    model = make_model(name)
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), ablate_heads(model, [(1, 2), (0, 0)]):
        ablated = model(ids).logits
    intact = model(ids).logits
    edited = make_model(name)
    with torch.no_grad():
        for layer, head in ((1, 2), (0, 0)):
            # proj.weight is (C_out, H*D): the head's input columns.
            edited.blocks[layer].attn.proj.weight[:, head * 8:(head + 1) * 8] = 0
        expected = edited(ids).logits
    torch.testing.assert_close(ablated, expected)
    assert not torch.allclose(ablated, intact)
    torch.testing.assert_close(model(ids).logits, intact)  # the hooks are gone


def test_mean_ablation_uses_the_heads_mean_output() -> None:
    model = make_model("gpt2-like")
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    seen = []
    hook = model.blocks[0].attn.proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        model(ids)
        with ablate_heads(model, [(0, 1)], how="mean"):
            model(ids)
    hook.remove()
    # Our hook ran first (registered first) and saw the untouched input both times; the
    # ablation hook rewrote it after: check by recomputing what Wo received.
    x = seen[0]
    expected = x.clone()
    expected[..., 8:16] = x[..., 8:16].mean(dim=(0, 1))
    with torch.no_grad(), ablate_heads(model, [(0, 1)], how="mean"):
        got = []
        h = model.blocks[0].attn.proj.register_forward_hook(lambda m, a, o: got.append(a[0]))
        model(ids)
        h.remove()
    torch.testing.assert_close(got[0], expected)


def test_ablation_errors_and_table() -> None:
    model = make_model("gpt2-like")
    with pytest.raises(ValueError, match="how must be one of"), ablate_heads(model, [(0, 0)],
                                                                           how="half"):
        pass
    with pytest.raises(ValueError, match="head 4 is out of range"), ablate_heads(model, [(0, 4)]):
        pass
    with pytest.raises(TypeError, match=r"\(layer, head\) pairs"), ablate_heads(model, [3]):
        pass
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    rows = ablation_table(model, ids, targets, groups=[[(0, 0), (1, 1)]])
    assert [r.heads for r in rows][:2] == [(), ((0, 0),)] and len(rows) == 1 + 8 + 1
    assert rows[-1].heads == ((0, 0), (1, 1)) and all(0 <= r.accuracy <= 1 for r in rows)
    assert not model.training
