"""In a real chromium: the page shown inline (as Jupyter shows ``_repr_html_``: a sandboxed iframe
inside another page) loads and draws; legends only for what the maps hold; the q·k view says when
the page has no q and k."""

from __future__ import annotations

import time

from maskedattn.viz import show, write_html

from .browser import needs_chromium
from .test_pages_inline import planted_maps

pytestmark = needs_chromium



def test_inline_page_draws_inside_a_sandboxed_iframe(browser, tmp_path) -> None:
    cell = show(planted_maps(), title="inline")._repr_html_()
    host = tmp_path / "notebook.html"
    host.write_text(f"<html><body><p>a notebook cell</p>{cell}"
                    "<script>document.body.dataset.ready = '1'</script></body></html>")
    browser.open(host)
    with browser.inside_iframe():
        ready = "document.body.dataset.ready === '1'"
        deadline = time.monotonic() + 20
        while not browser.evaluate(ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert browser.evaluate(ready)
        assert browser.evaluate("document.getElementById('status').textContent") == \
            "2 layers × 2 heads × 20 tokens; every weight"
        assert browser.evaluate("[layer.value, head.value]") == ["1", "1"]  # the induction head
        assert browser.evaluate("heatmap.width") == 20


def test_legends_follow_the_maps_and_pair_view_without_qk(browser, tmp_path) -> None:
    maps = planted_maps()
    page = write_html(maps, tmp_path / "plain.html")
    browser.open(page)
    assert browser.evaluate("document.getElementById('legend-gen').hidden")
    assert browser.evaluate("document.getElementById('legend-mark').hidden")
    assert browser.evaluate("document.querySelectorAll('.start-mark, .gen-mark').length") == 0
    cell = browser.evaluate("+heatmap.dataset.cell")
    box = browser.evaluate("(b => [b.left, b.top])(heatmap.getBoundingClientRect())")
    browser.click(box[0] + 2.5 * cell, box[1] + 12.5 * cell)
    assert "holds no q and k" in browser.evaluate("document.getElementById('pair').textContent")
    assert browser.evaluate("document.getElementById('effects').textContent") == ""
    generated = write_html(type(maps)(maps.probs, maps.tokens, token_ids=maps.token_ids,
                                      generated_from=15), tmp_path / "gen.html",
                           mark=(10, "the repeat starts"))
    browser.open(generated)
    assert not browser.evaluate("document.getElementById('legend-gen').hidden")
    assert browser.evaluate("document.getElementById('mark-label').textContent") == \
        "the repeat starts"
    assert browser.evaluate("document.querySelectorAll('.gen-mark').length") == 2
    assert browser.evaluate("document.querySelectorAll('.start-mark').length") == 2
