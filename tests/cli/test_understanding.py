"""Understanding the demo's trained model: ablation is causal evidence for the induction heads,
``explain --model`` works the five steps on real weights, and both pages work in a real chromium
(the attention page at 1400, 800 and 400 px; the steps page's interactions).

One full demo run (600 steps, about 40 s on two idle cores) serves every test of this module,
and every pytest-xdist worker.
"""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from maskedattn.cli.main import main
from tests.viz.browser import Browser, needs_chromium


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # Under pytest-xdist every worker would train its own copy: they share one instead, in the
    # run's common temporary directory, the first to arrive training while the others wait.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "understanding-demo"
    with open(root / "understanding-demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "ablation.json").is_file():
            assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    return out



def test_ablating_the_induction_heads_drops_the_repeat_to_chance(demo) -> None:
    report = json.loads((demo / "ablation.json").read_text())
    assert report["intact"] > 0.95
    assert report["induction_heads"] and all(layer == 1 for layer, _ in report["induction_heads"])
    # Near chance (1 in 64 = 1.6%): without those heads the model cannot find the earlier copy.
    assert report["induction_ablated"] < 0.10
    # Another head of the same layer matters little.
    assert report["control_ablated"] > 0.90
    assert report["control_head"] not in report["induction_heads"]


def test_ablate_command_reports_every_head_and_the_group(demo, capsys) -> None:
    heads = json.loads((demo / "ablation.json").read_text())["induction_heads"]
    group = ",".join(f"{layer}:{head}" for layer, head in heads)
    assert main(["ablate", "--model", str(demo / "model"), "--task", "induction",
                 "--group", group, "--batch", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["ablated", "loss", "Δloss", "accuracy"]
    assert lines[2].startswith("none (intact model)")
    assert len(lines) == 2 + 1 + 8 + 1  # title, header, intact, 2 x 4 heads, the group
    assert float(lines[-1].split()[-1].rstrip("%")) < 10
    assert main(["ablate", "--model", str(demo / "model"), "--task", "induction",
                 "--heads", "2:0"]) == 2
    assert "layer 2 is out of range" in capsys.readouterr().err


def test_explain_model_works_the_induction_head_with_real_weights(demo, capsys, tmp_path) -> None:
    # Four ids, then the same four again: the induction head's query at the second "9" (position
    # 7) finds the earlier 9 at position 3 and attends to what followed it, position 4.
    page = tmp_path / "steps.html"
    assert main(["explain", "--model", str(demo / "model"), "--ids", "3,17,40,9,3,17,40,9",
                 "--html", str(page)]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # prose is wrapped to the terminal
    assert "layer 1 of 2" in flat and "showing head" in flat
    for step in ("Step 0 - the input X", "(the residual stream after the layer's norm",
                 "Step 1b - positions (RoPE)", "[raw QKᵀ]", "[scaled]", "[masked]", "[probs]",
                 "Step 6", "One row worked through: query 7 '9'"):
        assert step in flat, step
    worked = out.split("One row worked through")[1]
    weights = {int(line.split()[1]): float(line.rsplit("= ", 1)[1])
               for line in worked.replace("\n    ", " ").splitlines()
               if line.startswith("key ") and "hidden" not in line}
    assert max(weights, key=weights.get) == 4 and weights[4] > 0.5
    assert page.is_file() and "http" not in page.read_text().split("<script")[0]
    assert main(["explain", "--model", str(demo / "model"), "--ids", "3,4", "--head", "9"]) == 2
    assert "--head 9 is out of range" in capsys.readouterr().err


def _scroll_width(browser: Browser) -> int:
    return browser.evaluate("document.documentElement.scrollWidth")


@needs_chromium
def test_demo_page_opens_on_induction_head_with_labels_mark_and_causes(demo, browser) -> None:
    browser.open(demo / "attention.html")
    assert browser.evaluate("[layer.value, head.value]") == ["1", "0"]  # the induction head
    assert browser.evaluate("document.getElementById('legend-gen').hidden")  # nothing generated
    assert not browser.evaluate("document.getElementById('legend-mark').hidden")
    assert browser.evaluate("document.querySelectorAll('.start-mark').length") == 2
    assert browser.evaluate("document.querySelector('#tokens .tok.start').dataset.i") == \
        str(browser.evaluate("JSON.parse(document.getElementById('meta').textContent).mark.at"))
    labels = browser.evaluate("Array.from(document.querySelectorAll('#x-axis span'), s =>"
                              " s.textContent)")
    tokens = browser.evaluate("JSON.parse(document.getElementById('meta').textContent).tokens")
    assert labels == tokens  # 36 tokens: every one labelled at this width
    # Click a cell: the q·k view of that pair; its products sum to the score shown.
    cell = browser.evaluate("+heatmap.dataset.cell")
    box = browser.evaluate("(b => [b.left, b.top])(heatmap.getBoundingClientRect())")
    browser.click(box[0] + 4.5 * cell, box[1] + 30.5 * cell)  # query 30, key 4
    pair = browser.evaluate("document.getElementById('pair').textContent")
    assert pair.startswith("q·k of query 30 ") and "key 4 " in pair
    assert browser.evaluate("document.querySelectorAll('#pair-table tr').length") == 8
    # Direct effects: one cell per head, the current head outlined; clicking one selects it.
    assert "the model predicts" in browser.evaluate("document.getElementById('effects')"
                                                    ".textContent")
    assert browser.evaluate("document.querySelectorAll('#effects td.eff').length") == 8
    at = browser.center_of('#effects td.eff[data-layer="0"][data-head="1"]')
    browser.mouse_move(*at)  # a real pointer gets there before it clicks
    browser.click(*at)
    assert browser.evaluate("[layer.value, head.value]") == ["0", "1"]
    # A row of the "attends to" table picks the key of the q·k view.
    at = browser.center_of("#detail tr.pick")
    browser.mouse_move(*at)
    browser.click(*at)
    assert browser.evaluate("document.getElementById('pair').textContent").startswith("q·k")


@needs_chromium
@pytest.mark.parametrize("width", [800, 400])
def test_demo_page_fits_narrow_windows(demo, browser, width, tmp_path) -> None:
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=900,
                 deviceScaleFactor=1, mobile=False)
    try:
        browser.open(demo / "attention.html")
        assert _scroll_width(browser) <= width  # no sideways scrolling of the page
        # The heatmap fits beside its labels, with no scroll bar of its own.
        assert browser.evaluate("(w => w.scrollWidth <= w.clientWidth)(document.getElementById("
                                "'map-wrap'))")
        # Prose wraps at a readable measure: not a word per line.
        assert browser.evaluate("document.getElementById('head-info').clientWidth") > 300
        shown = browser.evaluate("document.querySelectorAll('#x-axis span').length")
        assert 0 < shown <= 36 and (width == 800 or shown < 36)  # thinned at 400 px
        browser.screenshot(tmp_path / f"page-{width}.png")
    finally:
        browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000,
                     deviceScaleFactor=1, mobile=False)


@needs_chromium
def test_steps_page_pick_a_token_a_key_and_a_head(demo, browser) -> None:
    browser.open(demo / "steps.html")
    data = browser.evaluate("JSON.parse(document.getElementById('data').textContent)")
    h, i = data["head"], data["token"]
    assert browser.evaluate("document.querySelector('#tokens .query').dataset.i") == str(i)
    assert browser.evaluate("document.querySelectorAll('#keys tr.key').length") == \
        len(data["tokens"])
    # The softmax bars show the stored probabilities; the weighted values sum to o.
    shown = browser.evaluate("Array.from(document.querySelectorAll('#keys tr.key td.p'),"
                             " td => td.title)")
    assert shown[i - 1] == f"p{i - 1} = {data['probs'][h][i][i - 1]}"
    assert browser.evaluate("document.querySelectorAll('#values tr.value').length") >= 1
    # Pick another token, then a key: the q·k view lists products that add up to q·k.
    browser.click(*browser.center_of('#tokens .tok[data-i="25"]'))
    browser.click(*browser.center_of('#keys tr.key[data-j="8"]'))
    assert browser.evaluate("document.body.dataset.rendered") == f"{h}:25:8"
    products = browser.evaluate("Array.from(document.querySelectorAll('#pair-table tr'),"
                                " r => +r.cells[3].title.split(' = ')[1])")
    q, k = data["q"][h][25], data["k"][h // (data["heads"] // data["kv_heads"])][8]
    assert len(products) == data["head_dim"] == 16  # every product listed
    assert sum(products) == pytest.approx(sum(a * b for a, b in zip(q, k, strict=True)), abs=1e-3)
    assert products == sorted(products, key=abs, reverse=True)
    # Another head: its own numbers.
    browser.evaluate("head.value = '3'; head.dispatchEvent(new Event('change'))")
    assert browser.evaluate("document.body.dataset.rendered") == "3:25:8"
    raw = browser.evaluate("document.querySelector('#keys tr.key[data-j=\"3\"]').cells[2].title")
    assert raw.endswith(f"= {data['scores'][3][25][3]}")
    # Hovering a coloured cell tells its value.
    browser.mouse_move(*browser.center_of("#query .vec span"))
    assert browser.evaluate("document.getElementById('info').textContent").startswith("x[0] = ")
