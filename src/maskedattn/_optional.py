"""Import optional dependencies where they are used, with a message that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA_OF = {
    "matplotlib": "viz",
    "transformers": "hf",
    "tokenizers": "hf",
    "triton": "gpu",
    "tensorboard": "tensorboard",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = _EXTRA_OF.get(top, "dev")
        raise ImportError(
            f"{purpose} needs the optional package {top!r}; install it with"
            f" `pip install 'maskedattn[{extra}]'`"
        ) from err
