"""generate() and stream(): equal to recomputation, batching, sampling settings, stops, errors."""

import importlib

import pytest
import torch

import maskedattn as ma
from maskedattn.generate import SamplingSettings, sample, stream
from maskedattn.model import GPT, GPTConfig

CONFIGS = {
    "gpt2-like": dict(vocab_size=61, context=48, n_layer=2, n_head=3, n_embd=24,
                      tie_weights=False),
    "llama-like": dict(vocab_size=61, context=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                       mlp="swiglu", norm="rmsnorm", positions="rope", bias=False,
                       tie_weights=False),
}
PROMPTS = [[5, 17, 3, 40, 2, 9, 33], [7], [60, 1, 1, 2]]
GEN = importlib.import_module("maskedattn.generate")  # `maskedattn.generate` is the function


def make(name="gpt2-like", dtype=torch.float32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIGS[name])).to(dtype)
    with torch.no_grad():  # sharper logits than the 0.02 init: sampling settings matter
        model.lm_head.weight.mul_(20)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_greedy_equals_argmax_of_full_recomputation(name, dtype):
    model = make(name, dtype)
    got = ma.generate(model, [PROMPTS[0]], 12, temperature=0)[0]
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(PROMPTS[0]) :]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("settings", [
    dict(temperature=0),
    dict(temperature=0.9, top_k=20, seed=11),
    dict(temperature=1.2, top_p=0.8, repetition_penalty=1.3, seed=5),
])
def test_batched_prompts_of_unequal_lengths_equal_one_by_one(name, settings):
    model = make(name)
    together = ma.generate(model, PROMPTS, 10, **settings)
    alone = []
    for i, p in enumerate(PROMPTS):
        seed = settings.get("seed")
        one = {**settings, "seed": None if seed is None else seed + i}  # row i draws from seed+i
        alone.append(ma.generate(model, [p], 10, **one)[0])
    assert together == alone


def test_stream_yields_what_generate_returns_and_none_after_a_stop():
    model = make()
    free = ma.generate(model, PROMPTS, 8, temperature=0)
    stop = free[1][0]  # row 1 stops at once; the others where (and if) they meet it
    steps = list(stream(model, PROMPTS, 8, temperature=0, stop_tokens=[stop]))
    collected = ma.generate(model, PROMPTS, 8, temperature=0, stop_tokens=[stop])
    for i, full in enumerate(free):
        want = full[: full.index(stop) + 1] if stop in full else full  # stop token included
        assert collected[i] == want
        streamed = [s[i] for s in steps]
        assert streamed[: len(want)] == want
        assert all(t is None for t in streamed[len(want) :])
    assert len(steps) == max(len(r) for r in collected)


def test_seeded_sampling_is_reproducible():
    model = make()
    a = ma.generate(model, PROMPTS, 10, temperature=1.0, seed=3)
    assert a == ma.generate(model, PROMPTS, 10, temperature=1.0, seed=3)
    assert a != ma.generate(model, PROMPTS, 10, temperature=1.0, seed=4)


def test_sample_settings_on_hand_made_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0, -3.0]])
    greedy = SamplingSettings(temperature=0)
    assert sample(logits, greedy).tolist() == [0]
    seen = torch.tensor([[True, False, False, False]])
    penal = SamplingSettings(temperature=0, repetition_penalty=2.0)
    assert sample(logits, penal, seen=seen).tolist() == [1]  # 2.0 / 2 < 1.9
    neg = torch.tensor([[-1.0, -1.5, -9.0, -9.0]])
    assert sample(neg, penal, seen=seen).tolist() == [1]  # -1.0 * 2 < -1.5
    g = [torch.Generator().manual_seed(0)]
    wide = logits.expand(1, 4)
    draws = {int(sample(wide, SamplingSettings(top_k=2), g)) for _ in range(200)}
    assert draws == {0, 1}
    # top_p: p(0) ~ 0.5, p(1) ~ 0.45; 0.5 keeps only token 0, 0.9 keeps 0 and 1
    draws = {int(sample(wide, SamplingSettings(top_p=0.5), g)) for _ in range(100)}
    assert draws == {0}
    draws = {int(sample(wide, SamplingSettings(top_p=0.9), g)) for _ in range(200)}
    assert draws == {0, 1}
    low = {int(sample(wide, SamplingSettings(temperature=0.01), g)) for _ in range(50)}
    assert low == {0}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draws_follow_the_softmax(temperature):
    # 20000 seeded draws: each token's frequency within 5 standard errors of its exact
    # probability, and tokens of probability 0 (logit -inf) never drawn.
    inf = float("inf")
    logits = torch.tensor([[-inf, 1.0, -inf, 0.3, 2.0, -1.0, -inf]])
    n = 20000
    g = torch.Generator().manual_seed(7)
    tokens = sample(logits.expand(n, -1), SamplingSettings(temperature=temperature), [g] * n)
    freq = torch.bincount(tokens, minlength=logits.shape[-1]).double() / n
    probs = torch.softmax(logits[0].double() / temperature, dim=-1)
    assert torch.all((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt())


@pytest.mark.parametrize("vocab", [50, 3000, 50257])
@pytest.mark.parametrize("sharpness", [0.1, 3.0, 12.0])  # nucleus: most of the row ... a few
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_top_p_keeps_what_a_full_sort_keeps(vocab, sharpness, top_p):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(torch.randn(3, vocab, generator=g) * sharpness, dim=-1)
    # The definition: sorted, a token is dropped when the likelier ones reach top_p.
    ranked, order = probs.sort(dim=-1, descending=True)
    ranked = ranked.masked_fill(ranked.cumsum(dim=-1) - ranked >= top_p, 0.0)
    want = torch.zeros_like(probs).scatter_(-1, order, ranked)
    assert torch.equal(GEN._top_p(probs, top_p), want)


def test_one_row_samples_serially_and_the_thread_count_is_restored(monkeypatch):
    seen = []
    draw = GEN._draw
    monkeypatch.setattr(GEN, "_draw", lambda *a: (seen.append(torch.get_num_threads()),
                                                  draw(*a))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sample(torch.zeros(1, 5), SamplingSettings())
        assert seen == [1] and torch.get_num_threads() == 2
        sample(torch.zeros(3, 5), SamplingSettings())  # rows: torch splits their sorts by row
        assert seen == [1, 2]
        with pytest.raises(ValueError):
            sample(torch.full((1, 5), float("nan")), SamplingSettings())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("settings", [
    SamplingSettings(temperature=0), SamplingSettings(temperature=1.0),
    SamplingSettings(temperature=0, repetition_penalty=1.3),
    SamplingSettings(temperature=0.7, top_k=2, top_p=0.9, repetition_penalty=0.5),
])
@pytest.mark.parametrize("row", [
    [0.5, float("nan"), 0.1], [float("nan"), -1.0, 2.0], [float("inf"), 0.0, float("nan")],
    [float("-inf"), float("nan"), float("-inf")], [float("nan")] * 3,
])
def test_nan_logits_are_refused(settings, row):
    # Before: sampling failed inside torch.multinomial, and greedy decoding picked a token.
    # Now the row maxima are screened: a NaN anywhere in a row must be one, in any batch row.
    logits = torch.tensor([[0.0, 1.0, 2.0], row])
    seen = torch.tensor([[False, True, False], [True, True, False]])
    with pytest.raises(ValueError, match="hold NaN"):
        sample(logits, settings, seen=seen)


def test_a_row_with_no_possible_token_is_refused():
    with pytest.raises(ValueError, match="not finite or all zero"):
        sample(torch.full((1, 4), float("-inf")), SamplingSettings())


def test_zero_new_tokens_and_tensor_prompts():
    model = make()
    assert ma.generate(model, [[1, 2]], 0) == [[]]
    t = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert ma.generate(model, t, 3, temperature=0) == ma.generate(model, t.tolist(), 3,
                                                                   temperature=0)


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    ([[1] * 40], dict(max_new_tokens=9), ValueError, "49 positions, beyond the model's context"),
    ([[1, 61]], {}, ValueError, r"outside the vocabulary \[0, 61\): \[61\]"),
    ([[]], {}, ValueError, "prompts\\[0\\] is empty"),
    ("hello", {}, TypeError, "encode text first"),
    ([[1.5]], {}, TypeError, "list of int token ids"),
    ([[1]], dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an integer >= 0"),
    ([[1]], dict(temperature=-1), ValueError, "temperature must be"),
    ([[1]], dict(top_k=0), ValueError, "top_k must be"),
    ([[1]], dict(top_p=1.5), ValueError, "top_p must be"),
    ([[1]], dict(repetition_penalty=0), ValueError, "repetition_penalty must be"),
    ([[1]], dict(stop_tokens=[99]), ValueError, "stop_tokens must be token ids"),
    ([[1]], dict(seed=1.5), TypeError, "seed must be an int"),
])
def test_bad_requests_are_clear_errors(args, kwargs, error, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        ma.generate(make(), args, **kwargs)


def test_a_batch_larger_than_the_native_kernel_takes_still_matches_one_by_one():
    """Six rows decode through F.linear (the kernel takes at most 4), one row through the kernel:
    the two paths differ only by rounding, which must not change greedy tokens here."""
    model = make()
    prompts = [*PROMPTS, [9, 9], [30, 31, 32, 33, 34], [59]]
    together = ma.generate(model, prompts, 6, temperature=0)
    assert together == [ma.generate(model, [p], 6, temperature=0)[0] for p in prompts]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_decoding_gives_the_eager_tokens(name):
    model = make(name)
    settings = dict(temperature=0.9, top_k=20, seed=3)
    assert ma.generate(model, PROMPTS, 9, compile=True, **settings) == \
        ma.generate(model, PROMPTS, 9, **settings)


def test_the_compiled_decode_step_keeps_its_element_wise_kernels_on_the_calling_thread():
    """Inductor splits element-wise loops of 512 values per thread or more over OpenMP; in a
    decode step that only wakes workers that then spin on the cores the GEMV's helpers need."""
    from torch._inductor.utils import run_and_get_code

    from maskedattn.generate import _compiled_decode

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, context=16, n_layer=1, n_head=4, n_embd=512)).eval()
    cache = model.new_cache(1, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            model.hidden_states(torch.tensor([[1, 2, 3]]), cache=cache)
            _, code = run_and_get_code(_compiled_decode(), model, torch.tensor([4]),
                                       torch.tensor([3]), cache)
    finally:
        torch.set_num_threads(threads)
    assert code and not any("omp parallel" in c for c in code)
