"""Test-session settings shared by every test directory."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI draws the same examples on every run, so a red CI is a reproducible finding, never a
# coin toss; a developer's run keeps drawing new ones (and stores any failure it finds).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def browser():
    """One headless chromium per test module (the page tests of viz and cli)."""
    from tests.viz.browser import start_browser

    b = start_browser()
    yield b
    b.close()
