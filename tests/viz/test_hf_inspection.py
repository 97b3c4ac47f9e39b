"""Inspection tools on transformers models: capture through our backend, labels, ``viz``."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from maskedattn.cli.main import main  # noqa: E402
from maskedattn.viz import attention_rollout, head_scores  # noqa: E402
from maskedattn.viz.capture import capture_attention  # noqa: E402
from maskedattn.viz.hf import token_label  # noqa: E402
from tests.integrations.hf_tokenizer import byte_bpe  # noqa: E402

VOCAB = 300


def _tiny(family: str):
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    config = {
        "llama": lambda: transformers.LlamaConfig(**small),
        "gemma2": lambda: transformers.Gemma2Config(**small, head_dim=16, sliding_window=6),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2,
                                                n_head=4),
        "gpt_oss": lambda: transformers.GptOssConfig(
            **{**small, "intermediate_size": 64}, head_dim=16, num_local_experts=2,
            num_experts_per_tok=1, sliding_window=6,
            layer_types=["sliding_attention", "full_attention"]),
    }[family]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_oss"])
def test_capture_matches_eager_attentions_and_restores_the_model(family):
    model = _tiny(family)
    before = model.config._attn_implementation
    ids = torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), capture_attention(model, rows=[3, 18]) as cap:
        model(ids)
    assert model.config._attn_implementation == before
    maps = cap.maps([str(i) for i in ids[0].tolist()])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(ids, output_attentions=True).attentions
    for layer in range(2):
        rows = want[layer][0, :, [3, 18]]
        rows = rows / rows.sum(-1, keepdim=True)  # gpt-oss's sinks take a share: maps omit it
        assert (maps.probs[layer].float() - rows).abs().max() < 1e-5
    head_scores(maps)  # the downstream tools read these maps as they read ours
    attention_rollout(cap_full(model, ids))


def cap_full(model, ids):
    with torch.no_grad(), capture_attention(model) as cap:
        model(ids)
    return cap.maps([str(i) for i in ids[0].tolist()])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_capture_generate_through_the_cache(family):
    """Rows decoded one by one (Gemma 2's sliding layers keep only the last 5 keys) equal the
    attention of one eager forward over the whole text."""
    model = _tiny(family)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture_attention(model) as cap:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             min_new_tokens=4, do_sample=False, pad_token_id=0)
    maps = cap.maps([str(i) for i in out[0].tolist()])
    # The last token is sampled after the last forward: rows for the 10 tokens read.
    assert maps.probs.shape[-2:] == (10, 11)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(out, output_attentions=True).attentions
    for layer in range(2):
        assert (maps.probs[layer].float() - want[layer][0, :, :10]).abs().max() < 1e-5


def _byte_bpe():
    return byte_bpe(VOCAB, "the cat sat on the mat\nthe dog ran")


def test_labels_are_readable_text():
    tok = _byte_bpe()
    labels = [token_label(tok, i) for i in tok.encode("the cat\nsat ä").ids]
    assert "".join(labels).startswith("the␣cat↵sat␣")
    assert all("Ġ" not in label and "Ċ" not in label for label in labels)
    # A byte that is half of a character shows as its escape, not as a replacement mark.
    half = tok.token_to_id("Ã")
    assert token_label(tok, half) == "\\xc3"


def test_viz_command_on_a_transformers_directory(tmp_path, capsys):
    model_dir, out = tmp_path / "gemma2", tmp_path / "viz"
    _tiny("gemma2").save_pretrained(model_dir)
    _byte_bpe().save(str(model_dir / "tokenizer.json"))
    assert main(["viz", "--model", str(model_dir), "--text", "the cat sat on the mat",
                 "--generate", "3", "--out", str(out)]) == 0
    assert "attention.html" in capsys.readouterr().out
    for name in ("attention-grid.png", "attention.html", "heads.json"):
        assert (out / name).stat().st_size > 100, name
    assert json.loads((out / "heads.json").read_text())["layers"] == [0, 1]
    assert "the" in (out / "attention.html").read_text()
