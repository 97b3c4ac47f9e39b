"""Reading the small JSON files that sit beside weights (configs, tokenizer descriptions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(file: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``file``.

    Raises ``FileNotFoundError`` with the message ``missing`` when there is no such file, and
    ``ValueError`` naming the file when it is not a JSON object.
    """
    if not file.is_file():
        raise FileNotFoundError(missing)
    try:
        content = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise ValueError(f"{file} is nested too deeply to be a configuration file") from None
    if not isinstance(content, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(content).__name__}")
    return content
