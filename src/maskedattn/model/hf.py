"""GPT-2 checkpoints in the ``transformers`` format: config translation and weight names.

Hugging Face's GPT-2 keeps its matrices in ``Conv1D`` layers, whose weights are stored
(in, out): the transpose of an ``nn.Linear`` weight. Its attention projection ``c_attn`` is
already fused as q | k | v, in the same order and head layout as our ``qkv``, so the weights
map one to one. Nothing here imports ``transformers``: the files are plain JSON and safetensors.
"""

from __future__ import annotations

from typing import Any

from .config import GPTConfig

__all__ = ["config_from_transformers", "config_to_transformers", "weight_names"]

MODEL_TYPE = "gpt2"
# transformers' activation names for our two GELU forms: the tanh approximation, and erf.
_GELU = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
GPT2_VOCAB = 50257
_GPT2_EOT = 50256  # <|endoftext|>, GPT-2's only special token


def config_from_transformers(hf: dict[str, Any]) -> GPTConfig:
    """Our config for a ``transformers`` GPT-2 ``config.json``; unsupported options raise."""
    unsupported = []
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GELU:
        unsupported.append(f"activation_function={activation!r} (we implement"
                           f" {sorted(_GELU)})")
    if not hf.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights=false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention", False):
        unsupported.append("add_cross_attention=true")
    if unsupported:
        raise ValueError("this GPT-2 checkpoint uses options maskedattn does not implement: "
                         + ", ".join(unsupported))
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
               if k not in hf]
    if missing:
        raise ValueError(f"the GPT-2 config.json lacks {missing}")
    return GPTConfig(
        vocab_size=hf["vocab_size"], context=hf["n_positions"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], mlp=_GELU[activation],
        mlp_hidden=hf.get("n_inner"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_weights=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_to_transformers(config: GPTConfig) -> dict[str, Any]:
    """A ``transformers`` GPT-2 ``config.json`` for ``config``; raises if GPT-2 cannot hold it."""
    wanted = {"positions": ("learned",), "norm": ("layernorm",), "mlp": ("gelu", "gelu_exact"),
              "bias": (True,), "n_kv_head": (config.n_head,)}
    differ = [f"{k}={getattr(config, k)!r} (GPT-2 has {' or '.join(map(repr, v))})"
              for k, v in wanted.items() if getattr(config, k) not in v]
    if differ:
        raise ValueError("the transformers GPT-2 format cannot hold this model: "
                         + ", ".join(differ))
    special = _GPT2_EOT if config.vocab_size == GPT2_VOCAB else None
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.context,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden,
        "activation_function": "gelu_new" if config.mlp == "gelu" else "gelu",
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": special,
        "eos_token_id": special,
    }


def weight_names(config: GPTConfig) -> list[tuple[str, str, bool]]:
    """(our name, transformers name, transposed) for every stored weight of a GPT-2 model."""
    names = [("wte.weight", "transformer.wte.weight", False),
             ("wpe.weight", "transformer.wpe.weight", False)]
    parts = [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
             ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
             ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]
    for i in range(config.n_layer):
        for ours, theirs, conv1d in parts:
            names.append((f"blocks.{i}.{ours}.weight", f"transformer.h.{i}.{theirs}.weight",
                          conv1d))
            names.append((f"blocks.{i}.{ours}.bias", f"transformer.h.{i}.{theirs}.bias", False))
    names += [("norm.weight", "transformer.ln_f.weight", False),
              ("norm.bias", "transformer.ln_f.bias", False)]
    if not config.tie_weights:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def normalise_names(names: list[str], config: GPTConfig) -> dict[str, str]:
    """Map the tensor names of a GPT-2 file to the ``transformers`` names of :func:`weight_names`.

    Files saved from ``GPT2Model`` (such as the original release) lack the ``transformer.``
    prefix; old ones also hold the causal-mask buffers ``attn.bias``/``attn.masked_bias``, and
    some keep a copy of the tied LM head. Those are dropped.
    """
    conv_names = {theirs for _, theirs, _ in weight_names(config)}
    out = {}
    for name in names:
        full = name if name.startswith("transformer.") or name == "lm_head.weight" \
            else f"transformer.{name}"
        if full.endswith((".attn.bias", ".attn.masked_bias")) and full not in conv_names:
            continue
        if full == "lm_head.weight" and config.tie_weights:
            continue
        out[full] = name
    return out
