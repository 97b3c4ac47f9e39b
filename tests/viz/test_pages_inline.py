"""The pages without a browser: Jupyter display, the most telling head, the repeat mark, the extras
the attention page carries, and the steps page's data and errors."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch

from maskedattn.model import GPT, GPTConfig
from maskedattn.viz import (
    AttentionMaps,
    head_scores,
    layer_steps,
    page_extras,
    plot_grid,
    plot_head,
    render_html,
    show,
    show_steps,
)
from maskedattn.viz.html import most_telling_head
from maskedattn.viz.steps_html import MAX_STEPS_TOKENS, steps_page_data

from . import planted


def planted_maps() -> AttentionMaps:
    g = torch.Generator().manual_seed(0)
    ids = planted.repeated_random_tokens(10, 100, g)
    t = len(ids)
    layer0 = [planted.local(t, 3), planted.previous_token(t)]
    layer1 = [planted.uniform(t), planted.induction(ids)]
    return AttentionMaps(torch.stack([torch.stack(layer0), torch.stack(layer1)]),
                         [f"t{i}" for i in ids], token_ids=ids)


def meta_of(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="meta">(.*?)</script>', page, re.S)
    return json.loads(found[1])


def test_most_telling_head_prefers_specific_roles() -> None:
    scores = head_scores(planted_maps())
    assert most_telling_head(scores) == (1, 1)  # induction beats the previous-token head
    assert most_telling_head(scores, layer=0) == (0, 1)  # previous-token beats local


def test_page_opens_on_it_and_marks_the_repeat() -> None:
    maps = planted_maps()
    meta = meta_of(render_html(maps, mark=(10, "the repeat starts")))
    assert meta["initial"] == [1, 1]
    assert meta["mark"] == {"at": 10, "label": "the repeat starts"}
    assert "qk" not in meta and "effects" not in meta
    with pytest.raises(ValueError, match="mark must be"):
        render_html(maps, mark=(20, "past the end"))


def test_show_displays_inline_in_an_iframe() -> None:
    shown = show(planted_maps(), title="inline")._repr_html_()
    assert shown.startswith("<iframe srcdoc=") and 'sandbox="allow-scripts"' in shown
    page = html.unescape(shown.split('srcdoc="', 1)[1].split('" style=', 1)[0])
    assert "<title>inline</title>" in page and '"initial":[1,1]' in page


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", n_layer=2, n_head=2, n_embd=16, vocab_size=50,
                                context=64, positions="rope")).eval()


def test_extras_carry_q_k_and_direct_effects() -> None:
    model = small_model()
    ids = torch.arange(12) % 5
    extras = page_extras(model, ids, str)
    assert extras.q.shape == extras.k.shape == (2, 2, 12, 8)
    assert extras.effects.shape == (2, 2, 12) and len(extras.predicted) == 12
    steps = layer_steps(model, ids, 1)
    torch.testing.assert_close(extras.q[1], steps.q.float())
    maps = AttentionMaps(torch.stack([layer_steps(model, ids, i).trace.probs[0] for i in (0, 1)])
                         .float(), [str(i) for i in ids.tolist()])
    meta = meta_of(render_html(maps, extras=extras))
    assert meta["qk"]["dim"] == 8 and len(meta["effects"]) == 2
    assert len(meta["effects"][0][0]) == 12 and len(meta["predicted"]) == 12


def test_steps_page_data_and_errors() -> None:
    model = small_model()
    ids = [1, 2, 3, 1, 2]
    steps = layer_steps(model, ids, 0)
    labels = [str(i) for i in ids]
    data = steps_page_data(steps, labels, head=1)
    assert data["token"] == 4 and data["positions"] == "rope"
    assert data["visible"][0] == [1, 0, 0, 0, 0]
    assert data["scores"][1][4][0] == pytest.approx(
        float(steps.trace.scores[0, 1, 4, 0]), rel=1e-4)
    with pytest.raises(ValueError, match="head 2 is out of range"):
        steps_page_data(steps, labels, head=2)
    with pytest.raises(ValueError, match="one label per position"):
        steps_page_data(steps, labels[:3])
    torch.manual_seed(0)
    wide = GPT(GPTConfig.preset("tiny", n_layer=1, n_head=2, n_embd=16, vocab_size=50,
                                context=300)).eval()
    long = layer_steps(wide, [1] * (MAX_STEPS_TOKENS + 1), 0)
    with pytest.raises(ValueError, match="at most 256 tokens"):
        steps_page_data(long, ["a"] * (MAX_STEPS_TOKENS + 1))
    assert show_steps(steps, labels)._repr_html_().startswith("<iframe")


def test_pictures_take_a_mark() -> None:
    maps = planted_maps()
    fig = plot_head(maps, 1, 1, mark=(10, "the repeat starts"))
    assert "the repeat starts" in fig.axes[0].get_title()
    assert len(fig.axes[0].collections) == 2  # the vertical and the horizontal dashed line
    fig = plot_grid(maps, mark=(10, "the repeat starts"))
    assert any("the repeat starts" in t.get_text() for t in fig.texts)
