"""The step-slider page in a real headless chromium: it opens on the last step, the slider
shows another step's own page, and the reader's layer, head and pinned token carry over."""

from __future__ import annotations

import pytest
import torch

from maskedattn.viz import AttentionMaps
from maskedattn.viz.training_steps import render_steps_html, write_steps_html

from . import planted
from .browser import needs_chromium, start_browser

pytestmark = needs_chromium

T = 24


def steps() -> list[tuple[int, AttentionMaps]]:
    """Three 'checkpoints': blur, then a previous-token head, then an induction head too."""
    g = torch.Generator().manual_seed(0)
    ids = planted.repeated_random_tokens(T // 2, 100, g)
    tokens = [f"t{i}" for i in ids]
    blur = [planted.uniform(T), planted.uniform(T)]
    later = [[planted.previous_token(T), planted.uniform(T)],
             [planted.previous_token(T), planted.induction(ids)]]
    return [(0, AttentionMaps(torch.stack(blur)[None].expand(2, -1, -1, -1), tokens,
                              token_ids=ids))] + [
        (step, AttentionMaps(torch.stack([torch.stack(layer) for layer in (heads, heads)]),
                             tokens, token_ids=ids))
        for step, heads in zip((50, 100), later, strict=True)]


def test_slider_moves_between_steps_and_keeps_the_choice(tmp_path) -> None:
    page = write_steps_html(steps(), tmp_path / "steps.html", captions=["init", "s50", "s100"])
    assert "http://" not in page.read_text() and "https://" not in page.read_text()
    b = start_browser()
    try:
        b.open(page)
        assert b.evaluate("document.body.dataset.step") == "100"
        assert b.evaluate("document.getElementById('caption').textContent") == "s100"
        inner = "document.getElementById('frame').contentDocument"
        # The reader picks layer 1, head 1 and pins token 15 in the last step's page ...
        b.evaluate(f"""(() => {{ const d = {inner};
            d.getElementById('layer').value = '1';
            d.getElementById('layer').dispatchEvent(new Event('change'));
            d.getElementById('head').value = '1';
            d.getElementById('head').dispatchEvent(new Event('change'));
            d.querySelector('.tok[data-i="15"]').click(); }})()""")
        # ... then drags the slider to the first step: its own page, the same choice.
        b.evaluate("""(() => { const s = document.getElementById('step');
            s.value = '0'; s.dispatchEvent(new Event('input')); })()""")
        b.evaluate("""new Promise((ok) => (function poll() {
            document.body.dataset.ready === '1' ? ok(true) : setTimeout(poll, 10); })())""")
        assert b.evaluate("document.body.dataset.step") == "0"
        assert b.evaluate(f"{inner}.getElementById('layer').value") == "1"
        assert b.evaluate(f"{inner}.getElementById('head').value") == "1"
        assert b.evaluate(f"{inner}.querySelector('.tok.pinned').dataset.i") == "15"
        assert "init" in b.evaluate(f"{inner}.title")
        # The ▶ button goes one step later.
        x, y = b.center_of("#next")
        b.click(x, y)
        b.evaluate("""new Promise((ok) => (function poll() {
            document.body.dataset.ready === '1' ? ok(true) : setTimeout(poll, 10); })())""")
        assert b.evaluate("document.body.dataset.step") == "50"
    finally:
        b.close()


def test_bad_steps_are_refused() -> None:
    good = steps()
    with pytest.raises(ValueError, match="at least one"):
        render_steps_html([])
    with pytest.raises(ValueError, match="increasing"):
        render_steps_html([good[1], good[0]])
    with pytest.raises(TypeError, match="pairs"):
        render_steps_html([good[0][1]])
    with pytest.raises(ValueError, match="captions"):
        render_steps_html(good, captions=["a"])
    other = AttentionMaps(good[0][1].probs, ["x"] * T)
    with pytest.raises(ValueError, match="same tokens"):
        render_steps_html([good[0], (7, other)])
