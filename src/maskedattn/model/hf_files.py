"""The files around the weights of a ``transformers`` directory: shards, tokenizer, generation.

- Large checkpoints split their weights over shards listed in ``model.safetensors.index.json``
  (``{"weight_map": {tensor name: file}}``); :func:`shard_files` lists them.
- ``pipeline("text-generation", model=dir)`` needs a tokenizer (``tokenizer.json`` and a
  ``tokenizer_config.json`` naming its class and special tokens) and the ids that begin and
  end a text (``generation_config.json``); :func:`write_companions` writes them.

Nothing here imports ``transformers``: the files are JSON and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._jsonfile import read_json_object

__all__ = ["INDEX_FILE", "shard_files", "special_ids", "write_companions"]

INDEX_FILE = "model.safetensors.index.json"
# Names of the end-of-text and beginning-of-text tokens in common tokenizers, most usual first.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


def shard_files(directory: Path) -> list[Path] | None:
    """The weight files of a sharded checkpoint, or None when ``directory`` has no shard index."""
    index_file = directory / INDEX_FILE
    if not index_file.is_file():
        return None
    index = read_json_object(index_file, f"{index_file} is unreadable")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no weight_map")
    files = []
    for shard in sorted(set(map(str, weight_map.values()))):
        file = directory / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts or not file.is_file():
            raise ValueError(f"{index_file} lists the shard {shard!r}, which is not a file in"
                             f" {directory}")
        files.append(file)
    return files


def _hf_tokenizer(tokenizer: Any):
    """A ``tokenizers.Tokenizer`` from what the caller gave: one, our wrapper, or a path."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        from .._optional import require

        tokenizers = require("tokenizers", "exporting a tokenizer")
        path = Path(tokenizer)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return tokenizers.Tokenizer.from_file(str(file))
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # maskedattn's HFTokenizer wraps one
    if not hasattr(inner, "token_to_id") or not hasattr(inner, "save"):
        raise TypeError("tokenizer must be a tokenizers.Tokenizer, maskedattn's HFTokenizer or a"
                        f" path to a tokenizer.json; got {type(tokenizer).__name__} (byte and"
                        " character tokenizers have no transformers equivalent)")
    return inner


def special_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(bos, eos) ids of a ``tokenizers.Tokenizer`` found by their usual names; bos falls back
    to eos (GPT-2 uses ``<|endoftext|>`` for both)."""
    def first(names):
        for name in names:
            i = tokenizer.token_to_id(name)
            if i is not None:
                return name, i
        return None, None

    eos = first(_EOS_NAMES)
    bos = first(_BOS_NAMES)
    return (bos[1] if bos[1] is not None else eos[1]), eos[1]


def write_companions(directory: Path, meta: dict[str, Any], tokenizer: Any = None) -> None:
    """Write ``generation_config.json`` and, given a tokenizer, ``tokenizer.json`` and
    ``tokenizer_config.json``; fill ``meta``'s bos/eos ids from the tokenizer (in place,
    before the caller writes ``config.json``)."""
    tok = _hf_tokenizer(tokenizer)
    if tok is not None:
        bos, eos = special_ids(tok)
        if bos is not None:
            meta["bos_token_id"] = bos
        if eos is not None:
            meta["eos_token_id"] = eos
        tok.save(str(directory / "tokenizer.json"))
        names = {i: tok.id_to_token(i) for i in (bos, eos) if i is not None}
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": meta.get("max_position_embeddings", meta.get("n_positions")),
            "clean_up_tokenization_spaces": False,
            "bos_token": names.get(bos),
            "eos_token": names.get(eos),
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    generation = {"bos_token_id": meta.get("bos_token_id"),
                  "eos_token_id": meta.get("eos_token_id")}
    if generation["eos_token_id"] is not None:
        generation["pad_token_id"] = generation["eos_token_id"]
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
