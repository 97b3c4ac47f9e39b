"""Test-session settings shared by every test directory."""

from __future__ import annotations

import os

from hypothesis import settings

# CI draws the same examples on every run, so a red CI is a reproducible finding, never a
# coin toss; a developer's run keeps drawing new ones (and stores any failure it finds).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
