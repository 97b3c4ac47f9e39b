"""``maskedattn explain``: structure of the printout and of the JSON trace on a fixed seed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from maskedattn.cli.main import main


def run(capsys, *argv: str) -> str:
    assert main(["explain", *argv]) == 0
    return capsys.readouterr().out


def test_printout_walks_through_the_five_steps(capsys) -> None:
    out = run(capsys, "the cat sat on the mat", "--heads", "2", "--seed", "3")
    for step in ("Step 0 - the input X", "Step 1 - projections", "Step 1b - positions: none",
                 "Step 2 - raw scores", "[raw QKᵀ]", "[scaled]", "Step 3 - mask",
                 "Step 4 - softmax", "Step 5", "Step 6", "[output, dims 0-", "One row worked",
                 "Why the mask goes before the softmax"):
        assert step in out
    # Q, K and V of the chosen head, with an honest label (D = 8 dims fit: all of them).
    for name in ("Q", "K", "V"):
        assert f"[head 0, {name}, all 8 dims]" in out
    # Two equal words: equal rows, and the note that attention alone has no positions.
    assert "'the' at positions 0 and 4 has the same row of Q and of K" in out
    assert "attention alone has no notion of position" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    # Causal: the first query row hides every later key.
    masked_first_row = out.split("[masked]")[1].splitlines()[2]
    assert masked_first_row.split()[0] == "the" and masked_first_row.split()[2:] == ["-inf"] * 5
    # Every probability row sums to 1, and masking after the softmax breaks that.
    for block in out.split("[probs]")[1:]:
        rows = block.splitlines()[2:8]
        assert [float(r.split()[-1]) for r in rows] == [1.0] * 6
    wrong = next(line for line in out.splitlines() if line.startswith("wrong"))
    assert any(float(x) < 0.99 for x in wrong.split()[1:])


def test_json_trace_is_complete_and_consistent(capsys) -> None:
    data = json.loads(run(capsys, "a b c d", "--json", "--mask", "window:2", "--dim", "8"))
    assert data["tokens"] == ["a", "b", "c", "d"] and data["mask"] == "SlidingWindow(w=2)"
    heads, t, d = 2, 4, 4
    assert len(data["q"]) == heads and len(data["q"][0]) == t and len(data["q"][0][0]) == d
    for h in range(heads):
        for i, row in enumerate(data["probs"][h]):
            assert math.isclose(sum(row), 1.0, rel_tol=1e-12)
            visible = [j for j in range(t) if i - 2 < j <= i]
            assert [j for j, p in enumerate(row) if p > 0] == visible
            assert all((data["masked"][h][i][j] is None) == (j not in visible) for j in range(t))
    assert len(data["output"]) == t and len(data["output"][0]) == 8


def test_none_mask_and_bytes_tokens(capsys) -> None:
    out = run(capsys, "hi you", "--tokens", "bytes", "--mask", "none")
    assert "6 tokens: h | i | ␣ | y | o | u" in out
    assert "-inf" not in out.split("[masked]")[1].split("Step 4")[0]
    assert "the order does not matter" in out


def test_same_seed_same_output_other_seed_differs(capsys) -> None:
    a = run(capsys, "x y z", "--seed", "1")
    assert a == run(capsys, "x y z", "--seed", "1")
    assert a != run(capsys, "x y z", "--seed", "2")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["", "--mask", "causal"], "the text has no tokens"),
        (["a b", "--dim", "10", "--heads", "3"], "--dim 10 must be a positive multiple of"),
    ],
)
def test_bad_arguments_give_one_line_errors(capsys, argv, message) -> None:
    assert main(["explain", *argv]) == 2
    assert message in capsys.readouterr().err


def test_console_script_and_bad_mask() -> None:
    result = subprocess.run([sys.executable, "-m", "maskedattn", "explain", "a b", "--mask",
                             "window:0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "w must be an integer >= 1" in result.stderr


def test_chosen_head_token_and_page_in_random_mode(capsys, tmp_path) -> None:
    page = tmp_path / "steps.html"
    out = run(capsys, "a b c a", "--head", "1", "--token", "2", "--html", str(page))
    flat = " ".join(out.split())
    assert "[head 1, Q, all 8 dims]" in out and "showing head 1" in flat
    assert "One row worked through: query 2 'c', head 1" in flat
    assert "key 3 'a'" in flat and "hidden by the mask" in flat  # key 3 is after query 2
    assert "'a' at positions 0 and 3 has the same row of Q and of K" in flat
    html = page.read_text()
    assert '"positions":"none"' in html and '"head":1' in html and '"token":2' in html
    assert main(["explain", "a b", "--token", "5"]) == 2
    assert "--token 5 is out of range" in capsys.readouterr().err
