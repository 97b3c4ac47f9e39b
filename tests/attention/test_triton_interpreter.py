"""Under Triton's CPU interpreter the backend declines what the interpreter cannot compute."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from maskedattn.attention import lower_call
from maskedattn.attention.api import choose_backend
from tests.helpers import random_qkv

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


def _call(dtype: torch.dtype):
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16, dtype=dtype)
    return lower_call(q, k, v)


def test_interpreter_declines_bfloat16(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from maskedattn.attention import triton as backend

    # the interpreter multiplies bfloat16 tiles as raw integers: outputs ~1e9, no error
    reason = backend.why_not(_call(torch.bfloat16))
    assert reason is not None and "interpreter" in reason and "bfloat16" in reason
    with pytest.raises(ValueError, match=r"backend .triton. cannot serve this call.*bfloat16"):
        choose_backend(_call(torch.bfloat16), "triton")
    assert choose_backend(_call(torch.bfloat16)) != "triton"
    # what it computes correctly it still serves
    for dtype in (torch.float32, torch.float16):
        assert backend.why_not(_call(dtype)) is None
