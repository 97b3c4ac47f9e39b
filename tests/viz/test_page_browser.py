"""The page in a real headless chromium: loads from disk with no network, renders, reacts to a
hover, a click and a key, draws the heatmap, and a large view loads quickly (time recorded).

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped with a reason where it is absent.
"""

from __future__ import annotations

import struct
import time

import pytest
import torch

from maskedattn.viz import AttentionMaps, write_html
from maskedattn.viz.html import decode_maps, encode_maps

from . import planted
from .browser import Browser, needs_chromium

# Skipped on a developer's machine without chromium; on CI (CI=true) a missing chromium fails.
pytestmark = needs_chromium

T = 40
GENERATED_FROM = 30



@pytest.fixture(scope="module")
def maps() -> AttentionMaps:
    g = torch.Generator().manual_seed(0)
    ids = planted.repeated_random_tokens(T // 2, 500, g)
    layer0 = [planted.previous_token(T), planted.sink(T), planted.random_causal(T, g)]
    layer1 = [planted.induction(ids), planted.local(T, 4), planted.uniform(T)]
    return AttentionMaps(torch.stack([torch.stack(layer0), torch.stack(layer1)]),
                         [f"tok{i}" for i in ids], token_ids=ids, generated_from=GENERATED_FROM)


@pytest.fixture(scope="module")
def page(maps, tmp_path_factory):
    return write_html(maps, tmp_path_factory.mktemp("page") / "attention.html", top_k=64)


def text(browser: Browser, selector: str) -> str:
    return browser.evaluate(f"document.querySelector({selector!r}).textContent")


def pixel(browser: Browser, row: int, col: int) -> list[int]:
    return browser.evaluate(f"Array.from(document.getElementById('heatmap').getContext('2d')"
                            f".getImageData({col}, {row}, 1, 1).data)")


def lit_keys(browser: Browser) -> dict[int, float]:
    found = browser.evaluate("Array.from(document.querySelectorAll('#tokens .key'))"
                             ".map(s => [+s.dataset.i, +s.dataset.w])")
    return dict(map(tuple, found))


def hover_token(browser: Browser, position: int) -> None:
    browser.mouse_move(*browser.center_of(f'#tokens .tok[data-i="{position}"]'))


def test_loads_from_disk_with_no_network_and_renders(browser, page) -> None:
    browser.open(page)
    requests = [e["params"]["request"]["url"] for e in browser.events
                if e["method"] == "Network.requestWillBeSent"]
    assert requests and all(url.startswith(("file://", "data:")) for url in requests), requests
    assert text(browser, "#status") == "2 layers × 3 heads × 40 tokens; every weight"
    assert browser.evaluate("document.querySelectorAll('#tokens .tok').length") == T
    assert browser.evaluate("document.querySelectorAll('#tokens .tok.gen').length") == 10
    assert browser.evaluate("document.querySelectorAll('#overview td').length") == 6
    assert browser.evaluate("[heatmap.width, heatmap.height]") == [T, T]
    # It opens on the most telling head: the induction head, layer 1 head 0.
    assert browser.evaluate("[layer.value, head.value]") == ["1", "0"]
    assert text(browser, "#head-info").startswith("Layer 1, head 0: induction 1.00")
    # Layer 0 head 0 is previous-token: dark one below the diagonal, grey above it.
    browser.click(*browser.center_of('#overview td[data-layer="0"][data-head="0"]'))
    assert pixel(browser, 10, 9)[2] < 140 and pixel(browser, 10, 11)[:3] == [0xd4] * 3
    assert text(browser, "#head-info").startswith(
        "Layer 0, head 0: induction 0.00 · previous token 1.00")
    # The pinned query starts at the last token.
    assert browser.evaluate("document.querySelector('#tokens .pinned').dataset.i") == str(T - 1)


def test_hover_shows_whom_a_token_attends_to(browser, page, maps) -> None:
    browser.open(page)
    browser.click(*browser.center_of('#overview td[data-layer="0"][data-head="0"]'))
    hover_token(browser, 35)
    assert browser.evaluate("document.querySelector('#tokens .query').dataset.i") == "35"
    assert lit_keys(browser) == {34: 1.0}
    assert text(browser, "#detail").startswith(f"Token 35 \"{maps.tokens[35]}\" (generated)")
    hover_token(browser, 12)
    assert lit_keys(browser) == {11: 1.0}
    assert "@11" in text(browser, "#detail")


def test_clicking_a_head_and_the_weights_match_python(browser, page, maps) -> None:
    browser.open(page)
    browser.click(*browser.center_of('#overview td[data-layer="0"][data-head="2"]'))
    assert browser.evaluate("[layer.value, head.value]") == ["0", "2"]
    hover_token(browser, 25)
    shown = lit_keys(browser)
    expected = decode_maps(encode_maps(maps, top_k=64))[0, 2, 25]
    assert set(shown) == set(expected.nonzero().flatten().tolist())
    for key, weight in shown.items():
        assert weight == pytest.approx(expected[key].item(), abs=1e-4)
    # The second layer's first head is the induction head: 1.0 on the token after the copy.
    browser.evaluate("layer.value = '1'; layer.dispatchEvent(new Event('change'))")
    browser.evaluate("head.value = '0'; head.dispatchEvent(new Event('change'))")
    hover_token(browser, 25)
    assert lit_keys(browser) == {6: 1.0}  # token 25 is the copy of token 5
    assert text(browser, "#head-info").startswith("Layer 1, head 0: induction 1.00")


def test_heatmap_hover_click_and_arrow_keys(browser, page) -> None:
    browser.open(page)
    browser.click(*browser.center_of('#overview td[data-layer="0"][data-head="0"]'))
    browser.center_of("#heatmap")  # scrolled into view
    cell = browser.evaluate("+heatmap.dataset.cell")
    box = browser.evaluate("(b => [b.left, b.top])(heatmap.getBoundingClientRect())")
    browser.mouse_move(box[0] + 3.5 * cell, box[1] + 7.5 * cell)  # row 7, key 3
    assert text(browser, "#cell-info").startswith("query 7 ") and "key 3" in text(browser,
                                                                                 "#cell-info")
    assert ": 0.000" in text(browser, "#cell-info")  # previous-token head: only key 6
    browser.click(box[0] + 0.5 * cell, box[1] + 20.5 * cell)
    browser.mouse_move(5, 5)  # leave for the header: the pinned query shows
    assert browser.evaluate("document.querySelector('#tokens .pinned').dataset.i") == "20"
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="ArrowLeft", code="ArrowLeft",
                 windowsVirtualKeyCode=37)
    assert browser.evaluate("document.querySelector('#tokens .pinned').dataset.i") == "19"


def test_partial_rows_and_screenshot(browser, maps, tmp_path) -> None:
    rows = [3, 17, 39]
    partial = AttentionMaps(maps.probs[:, :, rows], maps.tokens, rows=rows,
                            generated_from=GENERATED_FROM)
    path = write_html(partial, tmp_path / "partial.html")
    browser.open(path)
    assert text(browser, "#status").endswith("(3 query rows captured); top 32 weights per row")
    assert browser.evaluate("[heatmap.width, heatmap.height]") == [T, 3]
    browser.click(*browser.center_of('#overview td[data-layer="0"][data-head="0"]'))
    hover_token(browser, 5)
    assert "its row was not captured" in text(browser, "#detail")
    hover_token(browser, 17)
    assert lit_keys(browser) == {16: 1.0}
    png = browser.screenshot(tmp_path / "page.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1400, 1000)  # IHDR width, height
    assert len(png) > 20_000  # not a blank page


def large_maps(t: int = 1024, layers: int = 12, heads: int = 12) -> AttentionMaps:
    """Random weights over every visible key: each row keeps its top 32 weights, all different,
    the worst case for the page's size."""
    g = torch.Generator().manual_seed(0)
    probs = torch.empty(layers, heads, t, t, dtype=torch.half)
    for layer in range(layers):
        w = torch.rand(heads, t, t, generator=g).tril_() ** 4  # a few keys stand out per row
        probs[layer] = w / w.sum(-1, keepdim=True)
    return AttentionMaps(probs, [f"w{i}" for i in range(t)], generated_from=t - 100)


def test_large_view_load_time(browser, tmp_path, record_property) -> None:
    """12 layers x 12 heads x 1024 tokens. Time is recorded, not asserted against the 2 s
    target (shared CI machines are noisy); the bound below only catches a broken page."""
    started = time.perf_counter()
    path = write_html(large_maps(), tmp_path / "large.html")
    build_s = time.perf_counter() - started
    times = []
    for _ in range(2):  # the first load includes chromium's cold start of the page machinery
        started = time.perf_counter()
        browser.open(path, timeout=60)
        times.append((time.perf_counter() - started, browser.evaluate("window.maskedattnLoadMs")))
    mb = path.stat().st_size / 1e6
    record_property("large_page_mb", round(mb, 1))
    record_property("large_page_build_s", round(build_s, 2))
    record_property("large_page_load_ms", [round(ms) for _, ms in times])
    print(f"\nlarge view: {mb:.1f} MB, built in {build_s:.1f} s, loads in "
          + ", ".join(f"{ms:.0f} ms (open {wall:.2f} s)" for wall, ms in times))
    assert text(browser, "#status").startswith("12 layers × 12 heads × 1024 tokens")
    assert min(ms for _, ms in times) < 15_000
