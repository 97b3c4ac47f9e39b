"""maskedattn as a transformers attention backend, on tiny random models of each family.

Every model is randomly initialised, saved to a temporary directory and loaded back with
``attn_implementation`` = ``"maskedattn"``, ``"sdpa"`` and ``"eager"``: nothing downloads.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskedattn.integrations.transformers import register  # noqa: E402

VOCAB = 96
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _config(family: str):
    """A tiny config of ``family``, exercising the feature the family is known for."""
    c = transformers
    if family == "gpt2":
        return c.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    if family == "llama":
        return c.LlamaConfig(**_SMALL)
    if family == "qwen2":  # q/k/v biases
        return c.Qwen2Config(**_SMALL)
    if family == "qwen3":  # q/k norms
        return c.Qwen3Config(**_SMALL, head_dim=16)
    if family == "mistral":  # sliding window on every layer
        return c.MistralConfig(**_SMALL, sliding_window=7)
    if family == "gemma":
        return c.GemmaConfig(**_SMALL, head_dim=16)
    if family == "gemma2":  # alternating local/global layers, softcap, query_pre_attn_scalar
        return c.Gemma2Config(**_SMALL, head_dim=16, sliding_window=6,
                              attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                              query_pre_attn_scalar=24)
    if family == "gemma3":
        return c.Gemma3TextConfig(**_SMALL, head_dim=16, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":  # fused qkv, MHA
        return c.Phi3Config(**{**_SMALL, "num_key_value_heads": 4}, pad_token_id=0)
    if family == "olmo2":
        return c.Olmo2Config(**_SMALL)
    if family == "starcoder2":
        return c.Starcoder2Config(**_SMALL, sliding_window=9)
    if family == "gpt_oss":  # attention sinks, alternating windows
        return c.GptOssConfig(**{**_SMALL, "intermediate_size": 64}, head_dim=16,
                              num_local_experts=2, num_experts_per_tok=1, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"])
    raise KeyError(family)


FAST = ["gpt2", "llama", "qwen2", "mistral", "gemma2", "phi3", "gpt_oss"]
SLOW = ["qwen3", "gemma", "gemma3", "olmo2", "starcoder2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> directory of a randomly initialised tiny model of that family."""
    dirs = {}

    def get(family: str):
        if family not in dirs:
            torch.manual_seed(0)
            config = _config(family)
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            d = tmp_path_factory.mktemp(family)
            model.save_pretrained(d)
            dirs[family] = d
        return dirs[family]

    return get


def _load(path, impl: str, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=impl, dtype=dtype).eval()


def _batch(seed: int = 1):
    """Three rows of 23 tokens: unpadded, 5 and 11 tokens of left padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


def _check_logits(path, dtype):
    """Logits of real tokens against sdpa and eager in float32; in bfloat16 our error from the
    float32 logits may be at most twice that of sdpa or eager run in bfloat16 (plus a little),
    the tolerance the bfloat16 references earn themselves."""
    ids, mask = _batch()
    real = mask.bool()
    ours = _load(path, register(), dtype)
    # Models that cannot run SDPA (Gemma 2's softcap, gpt-oss's sinks) compare with eager only.
    impls = ("sdpa", "eager") if ours._supports_sdpa else ("eager",)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits.float()[real]
        if dtype == torch.float32:
            for impl in impls:
                want = _load(path, impl)(ids, attention_mask=mask).logits[real]
                err = (got - want).abs().max().item()
                assert err <= 2e-4 * max(1.0, want.abs().max().item()), (impl, err)
            return
        exact = _load(path, "eager")(ids, attention_mask=mask).logits[real]
        theirs = max((_load(path, impl, dtype)(ids, attention_mask=mask).logits.float()[real]
                      - exact).abs().max().item() for impl in impls)
    err = (got - exact).abs().max().item()
    assert err <= 2 * theirs + 1e-2 * max(1.0, exact.abs().max().item()), (err, theirs)


@pytest.mark.parametrize("family", FAST)
def test_logits_match_sdpa_and_eager_with_left_padding(saved, family):
    _check_logits(saved(family), torch.float32)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_logits_match_in_bfloat16(saved, family):
    _check_logits(saved(family), torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAST + SLOW)
def test_logits_every_family(saved, family, dtype):
    _check_logits(saved(family), dtype)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_token_equal(saved, family, cache):
    ids, mask = _batch(2)
    path = saved(family)
    kw = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
              cache_implementation=cache)
    with torch.no_grad():
        want = _load(path, "eager").generate(ids, **kw)
        got = _load(path, register()).generate(ids, **kw)
    assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAST + SLOW)
def test_greedy_generate_every_family(saved, family):
    ids, mask = _batch(3)
    path = saved(family)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(_load(path, register()).generate(ids, **kw),
                           _load(path, "eager").generate(ids, **kw))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_output_attentions_rebuilt_from_lse(saved, family):
    ids, mask = _batch()
    path = saved(family)
    real = mask.bool()[:, None, :, None]  # rows of real tokens
    with torch.no_grad():
        got = _load(path, register())(ids, attention_mask=mask, output_attentions=True)
        want = _load(path, "eager")(ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 2
    for a, b in zip(got.attentions, want.attentions, strict=True):
        assert a.shape == b.shape
        assert ((a - b) * real).abs().max() < 1e-5


def test_set_attn_implementation_and_register_is_idempotent(saved):
    path = saved("llama")
    assert register() == register() == "maskedattn"
    ids, mask = _batch()
    model = _load(path, "sdpa")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(register())
        assert model.config._attn_implementation == "maskedattn"
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - want)[real].abs().max() < 1e-4


def test_packed_sequences_through_position_ids(saved):
    """Two sequences packed in one row (position ids restart) see only themselves."""
    path = saved("mistral")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(1, VOCAB, (1, 9), generator=g), torch.randint(1, VOCAB, (1, 13),
                                                                       generator=g)
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(9), torch.arange(13)])[None]
    ours = _load(path, register())
    with torch.no_grad():
        # transformers reads packing from the position ids only without a cache.
        got = ours(packed, position_ids=positions, use_cache=False).logits
        alone = torch.cat([ours(a).logits, ours(b).logits], 1)
        want = _load(path, "sdpa")(packed, position_ids=positions, use_cache=False).logits
    assert (got - alone).abs().max() < 1e-4
    assert (got - want).abs().max() < 1e-4


def test_right_padding_and_custom_4d_mask(saved):
    path = saved("qwen2")
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    real = mask.bool()
    with torch.no_grad():
        got = _load(path, register())(ids, attention_mask=mask).logits
        want = _load(path, "sdpa")(ids, attention_mask=mask).logits
        assert (got - want)[real].abs().max() < 1e-4
        # A 4-D float mask is taken as it is (here: each token sees only the last 4 tokens).
        t = ids.shape[1]
        q, k = torch.arange(t)[:, None], torch.arange(t)[None]
        visible = (k <= q) & (q - k < 4)
        float_mask = torch.zeros(1, 1, t, t).masked_fill(~visible, torch.finfo(torch.float32).min)
        got = _load(path, register())(ids, attention_mask=float_mask).logits
        want = _load(path, "eager")(ids, attention_mask=float_mask).logits
    assert (got - want).abs().max() < 1e-4


def test_training_dropout_falls_back_with_one_warning(saved):
    path = saved("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=register(), attention_dropout=0.5)
    model.train()
    ids, mask = _batch()
    from maskedattn.integrations import transformers as integration

    integration._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(ids, attention_mask=mask).logits.sum().backward()
        model(ids, attention_mask=mask)
    messages = [str(w.message) for w in caught if "maskedattn" in str(w.message)]
    assert len(messages) == 1 and "dropout" in messages[0]


def test_gradients_match_sdpa(saved):
    path = saved("llama")
    ids, mask = _batch()
    # Only logits of real tokens may reach the loss: a padding token's row differs by design.
    labels = ids.clone()
    labels[:, 1:][mask[:, :-1] == 0] = -100
    labels[mask == 0] = -100
    grads = []
    for impl in (register(), "sdpa"):
        model = _load(path, impl)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_torch_compile_of_the_model(saved):
    """Compiled, the model runs our operator (not an sdpa fallback) and stays exact on a padded
    batch (before the operators, the ctypes kernel under compile gave wrong rows here)."""
    model = _load(saved("llama"), register())
    ids, mask = _batch()
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(model, backend=backend)(ids, attention_mask=mask).logits
        inductor = torch.compile(model)(ids, attention_mask=mask).logits
    assert any("maskedattn" in t for t in targets), "the compiled graph does not call our op"
    real = mask.bool()
    assert (got - want)[real].abs().max() < 1e-5
    assert (inductor - want)[real].abs().max() < 1e-5


def test_mask_closures_we_cannot_read_run_dense():
    """An or_masks overlay (image tokens attending both ways) becomes sdpa's dense mask."""
    from transformers import masking_utils as mu

    from maskedattn.integrations.transformers import StructuredMask, mask_interface

    def image_block(batch_idx, head_idx, q_idx, kv_idx):
        return (q_idx < 4) & (kv_idx < 4)

    fn = mu.or_masks(mu.causal_mask_function, image_block)
    got = mask_interface(batch_size=1, q_length=6, kv_length=6, mask_function=fn)
    want = mu.sdpa_mask(batch_size=1, q_length=6, kv_length=6, mask_function=fn,
                        allow_is_causal_skip=False)
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    window = mask_interface(batch_size=1, q_length=6, kv_length=6,
                            mask_function=mu.sliding_window_causal_mask_function(3))
    assert isinstance(window, StructuredMask) and repr(window.spec) == "SlidingWindow(w=3)"
