"""Errors that stop an operation for a reason its user can act on (not a bug in maskedattn).

Every layer may raise these; the command line prints their message as one line and exits 1.
(Bad arguments are ``ValueError``/``TypeError``: the command line exits 2 for those.)
"""

from __future__ import annotations

__all__ = ["Failure"]


class Failure(RuntimeError):
    """The work could not be completed; the message says what happened and what to do."""
