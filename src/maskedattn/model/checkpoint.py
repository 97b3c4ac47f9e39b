"""Checkpoint directories: ``config.json`` + ``model.safetensors``, ours or ``transformers`` GPT-2.

Our ``config.json`` is ``{"format": "maskedattn", "format_version": 1, "config": {...}}`` with the
fields of :class:`GPTConfig`; a ``transformers`` one has ``"model_type": "gpt2"``. Weights are
safetensors only, never pickle: loading a checkpoint cannot run code. Every problem with a
directory (unreadable files, foreign formats, missing, unexpected or misshapen tensors) is a
``ValueError`` that lists what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._jsonfile import read_json_object
from . import hf, hf_files, hf_llama
from .config import GPTConfig
from .gpt import GPT
from .safety import check_layers, read_header

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "save"]

FORMAT = "maskedattn"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_SHOW = 12  # names listed in an error message before "... and N more"


def save(model: GPT, path: str | Path, *, format: str = FORMAT, tokenizer: Any = None) -> None:
    """Write ``model`` as a checkpoint directory, in our format or ``format="transformers"``.

    In the transformers format (GPT-2, or Llama/Qwen2/Mistral for llama-style models) the
    directory also gets ``generation_config.json`` and, given ``tokenizer`` (a
    ``tokenizers.Tokenizer``, our ``HFTokenizer`` or a path to a ``tokenizer.json``), the
    tokenizer files that ``transformers.pipeline`` needs.
    """
    state = _stored_state(model)
    if format == FORMAT:
        meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                                "config": model.config.to_dict()}
    elif format == "transformers" and hf_llama.handles(model.config):
        meta = hf_llama.config_to_transformers(model.config)
        meta["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
        state = hf_llama.to_transformers(state, model.config)
    elif format == "transformers":
        meta = hf.config_to_transformers(model.config)
        meta["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
        state = {theirs: state[ours].t() if conv1d else state[ours]
                 for ours, theirs, conv1d in hf.weight_names(model.config)}
    else:
        raise ValueError(f"format must be {FORMAT!r} or 'transformers', got {format!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    if format == "transformers":
        hf_files.write_companions(path, meta, tokenizer)
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load(path: str | Path, *, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> GPT:
    """Read a checkpoint directory written by :func:`save` or by ``transformers`` (GPT-2)."""
    path = Path(path)
    meta = _read_config(path)
    # Names and shapes only: the config is held against the file before anything is built.
    files = hf_files.shard_files(path) or [path / WEIGHTS_FILE]
    weights = files[0] if len(files) == 1 else path / hf_files.INDEX_FILE
    header: dict[str, Tensor] = {}
    for file in files:
        header.update(read_header(file))
    llama = meta.get("model_type") in hf_llama.MODEL_TYPES
    if meta.get("model_type") == hf.MODEL_TYPE:
        config = hf.config_from_transformers(meta)
    elif llama:
        config = hf_llama.config_from_transformers(meta)
    elif meta.get("format") == FORMAT:
        config = _our_config(meta, path)
    else:
        raise ValueError(
            f"{path / CONFIG_FILE} is neither a maskedattn checkpoint (\"format\": {FORMAT!r})"
            f" nor a transformers GPT-2, Llama, Qwen2 or Mistral (\"model_type\"); it has format="
            f"{meta.get('format')!r}, model_type={meta.get('model_type')!r}"
        )
    check_layers(config.n_layer, header, weights)  # before any module is built
    if meta.get("model_type") == hf.MODEL_TYPE:
        names = hf.weight_names(config)
    else:
        names = [(name, name, False) for name in _stored_names(config)]
    with torch.device("meta"):  # shapes only: the weights come from the file
        skeleton = GPT(config)
    if llama:
        _check_tensors(hf_llama.expected_shapes(config),
                       hf_llama.without_tied_copy(header, config), weights)
        tensors = hf_llama.to_ours(hf_llama.without_tied_copy(_read_files(files), config),
                                   config)
    else:
        renamed = {name: name for name in header}
        if meta.get("model_type") == hf.MODEL_TYPE:
            renamed = hf.normalise_names(list(header), config)
        skeleton_state = skeleton.state_dict()
        expected = {stored: _stored_shape(skeleton_state[ours].shape, conv1d)
                    for ours, stored, conv1d in names}
        _check_tensors(expected, {full: header[name] for full, name in renamed.items()},
                       weights)
        tensors = _read_files(files)
        tensors = {full: tensors[name] for full, name in renamed.items()}
    state = {ours: tensors[stored].t() if conv1d else tensors[stored]
             for ours, stored, conv1d in names}
    dtype = dtype or state["wte.weight"].dtype
    state = {name: t.to(dtype).contiguous() for name, t in state.items()}
    if config.tie_weights:
        state["lm_head.weight"] = state["wte.weight"]
    skeleton.load_state_dict(state, assign=True)
    if config.tie_weights:  # assign=True made two parameters; make them one again
        skeleton.lm_head.weight = skeleton.wte.weight
    return skeleton.to(device) if device is not None else skeleton


def _stored_names(config: GPTConfig) -> list[str]:
    """The state-dict names written to the file: a tied LM head is stored once, as wte."""
    with torch.device("meta"):
        names = list(GPT(config).state_dict())
    return [n for n in names if not (config.tie_weights and n == "lm_head.weight")]


def _stored_state(model: GPT) -> dict[str, Tensor]:
    state = model.state_dict()
    return {name: state[name] for name in _stored_names(model.config)}


def _stored_shape(shape: torch.Size, transposed: bool) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transposed else tuple(shape)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    return read_json_object(path / CONFIG_FILE,
                            f"{path} holds no {CONFIG_FILE}: not a checkpoint directory")


def _our_config(meta: dict[str, Any], path: Path) -> GPTConfig:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE} has format_version {version!r}; this maskedattn"
                         f" reads version {FORMAT_VERSION}")
    try:
        return GPTConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_FILE}: invalid config: {err}") from None


def _read_files(files: list[Path]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(_read_weights(file))
    return tensors


def _read_weights(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent} holds no {file.name}")
    try:
        return load_file(file)
    except Exception as err:  # safetensors raises its own error types for broken files
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None


def _check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor],
                   file: Path) -> None:
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    misshapen = [f"{n} {tuple(tensors[n].shape)} (wanted {expected[n]})"
                 for n in expected if n in tensors and tuple(tensors[n].shape) != expected[n]]
    not_float = [f"{n} ({tensors[n].dtype})" for n in expected
                 if n in tensors and not tensors[n].dtype.is_floating_point]
    problems = [f"{what}: {_listing(names)}" for what, names in
                (("missing", missing), ("unexpected", unexpected),
                 ("wrong shape", misshapen), ("not floating point", not_float)) if names]
    if problems:
        raise ValueError(f"{file} does not match its config.json; " + "; ".join(problems))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")
