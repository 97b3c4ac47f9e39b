"""The GELU benchmark runs end to end (a small shape; timings are not checked)."""

import pytest

from maskedattn.cli.main import main
from maskedattn.model import gelu


@pytest.mark.skipif(gelu._library() is None, reason=gelu.native_status())
def test_quick_run_prints_every_dtype_form_and_pass(capsys):
    assert main(["bench", "gelu", "--rows", "3", "--width", "17", "--repeats", "1",
                 "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("float32", "bfloat16"))]
    assert len(rows) == 8 and all(line.endswith("x") for line in rows)
