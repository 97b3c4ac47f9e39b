"""Llama-family checkpoints (Llama, Qwen2, Mistral) in the ``transformers`` format.

The three share one architecture, which is our llama-style configuration: RMSNorm before
attention and MLP, SwiGLU, rotary positions in the "rotate half" layout, grouped-query
attention. They differ in small switches, each a :class:`GPTConfig` field:

============  ==========================================  ===========================
family        what differs                                our field
============  ==========================================  ===========================
Llama         rope scaling (``linear``, Llama 3's         ``rope_scaling``
              ``llama3``), biases everywhere or nowhere   ``bias``
Qwen2         biases on q, k and v only                   ``qkv_bias``
Mistral       a sliding window on every layer             ``window``
============  ==========================================  ===========================

transformers keeps q, k, v and gate, up as separate matrices; we fuse them (``attn.qkv`` =
q | k | v rows, ``mlp.fc`` = gate | up rows), in the same head layout, so converting is
concatenating and splitting rows. Nothing here imports ``transformers``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .config import GPTConfig

__all__ = ["MODEL_TYPES", "config_from_transformers", "config_to_transformers",
           "expected_shapes", "handles", "to_ours", "to_transformers"]

MODEL_TYPES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mistral": "MistralForCausalLM"}


def handles(config: GPTConfig) -> bool:
    """Whether ``config`` is llama-style (exported in one of :data:`MODEL_TYPES`)."""
    return config.positions == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu"


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling or None) from transformers 5's ``rope_parameters`` or 4's keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    from .rope import SCALINGS

    if kind not in SCALINGS:
        raise ValueError(f"rope scaling {kind!r} is not implemented (we implement"
                         f" {sorted(SCALINGS)})")
    return theta, {"rope_type": kind, **{k: params[k] for k in SCALINGS[kind] if k in params}}


def config_from_transformers(hf: dict[str, Any]) -> GPTConfig:
    """Our config for a Llama, Qwen2 or Mistral ``config.json``; unsupported options raise."""
    kind = hf.get("model_type")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"the {kind} config.json lacks {missing}")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (we implement SwiGLU with silu)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_head != n_embd:
        unsupported.append(f"head_dim={head_dim} with hidden_size={n_embd} and {n_head} heads"
                           " (we need head_dim = hidden_size / heads)")
    bias, qkv_bias = False, False
    if kind == "qwen2":
        qkv_bias = True
    elif kind == "llama":
        attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if attn_bias != mlp_bias:
            unsupported.append(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (we have"
                               " biases on every linear layer or on none)")
        bias = qkv_bias = bool(attn_bias)
    window = None
    if kind == "mistral":
        window = hf.get("sliding_window")
    elif hf.get("use_sliding_window", False):
        unsupported.append("use_sliding_window=true (per-layer windows)")
    try:
        theta, scaling = _rope(hf)
    except ValueError as err:
        unsupported.append(str(err))
        theta, scaling = 10000.0, None
    if unsupported:
        raise ValueError(f"this {kind} checkpoint uses options maskedattn does not implement: "
                         + "; ".join(unsupported))
    return GPTConfig(
        vocab_size=hf["vocab_size"], context=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd, mlp="swiglu",
        mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rope", rope_base=theta, rope_scaling=scaling, bias=bias, qkv_bias=qkv_bias,
        window=window, tie_weights=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_to_transformers(config: GPTConfig) -> dict[str, Any]:
    """A Llama, Qwen2 (q/k/v biases only) or Mistral (window) ``config.json`` for ``config``."""
    if not handles(config):
        raise ValueError("the transformers Llama format needs positions='rope', norm='rmsnorm'"
                         f" and mlp='swiglu', got {config.positions!r}, {config.norm!r},"
                         f" {config.mlp!r}")
    if config.window is not None:
        kind = "mistral"
    elif config.qkv_bias and not config.bias:
        kind = "qwen2"
    else:
        kind = "llama"
    if kind != "llama" and config.bias:
        raise ValueError(f"the transformers {kind} format has no biases outside q, k and v")
    if kind == "mistral" and config.qkv_bias:
        raise ValueError("the transformers mistral format has no q, k, v biases")
    if kind == "llama" and config.qkv_bias != config.bias:
        raise ValueError("the transformers llama format has biases on every linear layer or on"
                         " none")
    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling, "rope_theta": config.rope_base}
    out: dict[str, Any] = {
        "model_type": kind,
        "architectures": [_ARCHITECTURES[kind]],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_weights,
        "initializer_range": config.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if kind == "llama":
        out.update(attention_bias=config.bias, mlp_bias=config.bias)
    if kind == "mistral":
        out["sliding_window"] = config.window
    if kind == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def _layer(i: int) -> str:
    return f"model.layers.{i}"


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a transformers checkpoint of ``config`` holds, with its shape."""
    c, d, hidden = config.n_embd, config.head_dim, config.mlp_hidden
    kv = config.n_kv_head * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, c)}
    for i in range(config.n_layer):
        p = _layer(i)
        for name, shape in ((".self_attn.q_proj", (c, c)), (".self_attn.k_proj", (kv, c)),
                            (".self_attn.v_proj", (kv, c)), (".self_attn.o_proj", (c, c)),
                            (".mlp.gate_proj", (hidden, c)), (".mlp.up_proj", (hidden, c)),
                            (".mlp.down_proj", (c, hidden))):
            shapes[p + name + ".weight"] = shape
            qkv = name in (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj")
            if config.qkv_bias if qkv else config.bias:
                shapes[p + name + ".bias"] = shape[:1]
        shapes[p + ".input_layernorm.weight"] = (c,)
        shapes[p + ".post_attention_layernorm.weight"] = (c,)
    shapes["model.norm.weight"] = (c,)
    if not config.tie_weights:
        shapes["lm_head.weight"] = (config.vocab_size, c)
    return shapes


def to_ours(tensors: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """transformers tensors (checked against :func:`expected_shapes`) in our names, fused.

    A tied checkpoint that still stores ``lm_head.weight`` has that copy dropped.
    """
    out = {"wte.weight": tensors["model.embed_tokens.weight"],
           "norm.weight": tensors["model.norm.weight"]}
    if not config.tie_weights:
        out["lm_head.weight"] = tensors["lm_head.weight"]
    for i in range(config.n_layer):
        p, b = _layer(i), f"blocks.{i}"
        attn = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
        out[f"{b}.attn.qkv.weight"] = torch.cat([tensors[n + ".weight"] for n in attn])
        if config.qkv_bias:
            out[f"{b}.attn.qkv.bias"] = torch.cat([tensors[n + ".bias"] for n in attn])
        mlp = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        out[f"{b}.mlp.fc.weight"] = torch.cat([tensors[n + ".weight"] for n in mlp])
        out[f"{b}.attn.proj.weight"] = tensors[f"{p}.self_attn.o_proj.weight"]
        out[f"{b}.mlp.proj.weight"] = tensors[f"{p}.mlp.down_proj.weight"]
        if config.bias:
            out[f"{b}.mlp.fc.bias"] = torch.cat([tensors[n + ".bias"] for n in mlp])
            out[f"{b}.attn.proj.bias"] = tensors[f"{p}.self_attn.o_proj.bias"]
            out[f"{b}.mlp.proj.bias"] = tensors[f"{p}.mlp.down_proj.bias"]
        out[f"{b}.norm1.weight"] = tensors[f"{p}.input_layernorm.weight"]
        out[f"{b}.norm2.weight"] = tensors[f"{p}.post_attention_layernorm.weight"]
    return out


def without_tied_copy(tensors: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Drop a stored ``lm_head.weight`` of a tied model (some exporters keep the copy)."""
    if config.tie_weights and "lm_head.weight" in tensors:
        return {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    return tensors


def to_transformers(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Our stored state (tied head stored once) as transformers tensors: the inverse of
    :func:`to_ours`."""
    c, kv = config.n_embd, config.n_kv_head * config.head_dim
    out = {"model.embed_tokens.weight": state["wte.weight"],
           "model.norm.weight": state["norm.weight"]}
    if not config.tie_weights:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        p, b = _layer(i), f"blocks.{i}"
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            q, k, v = state[f"{b}.attn.qkv.{kind}"].split([c, kv, kv])
            out.update({f"{p}.self_attn.q_proj.{kind}": q, f"{p}.self_attn.k_proj.{kind}": k,
                        f"{p}.self_attn.v_proj.{kind}": v})
        for kind in ("weight", "bias") if config.bias else ("weight",):
            gate, up = state[f"{b}.mlp.fc.{kind}"].chunk(2)
            out.update({f"{p}.mlp.gate_proj.{kind}": gate, f"{p}.mlp.up_proj.{kind}": up,
                        f"{p}.self_attn.o_proj.{kind}": state[f"{b}.attn.proj.{kind}"],
                        f"{p}.mlp.down_proj.{kind}": state[f"{b}.mlp.proj.{kind}"]})
        out[f"{p}.input_layernorm.weight"] = state[f"{b}.norm1.weight"]
        out[f"{p}.post_attention_layernorm.weight"] = state[f"{b}.norm2.weight"]
    return out
