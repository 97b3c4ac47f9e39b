"""``GPTConfig``: every architectural choice of the decoder-only transformer, with named presets.

>>> GPTConfig.preset("gpt2").n_embd
768
>>> GPTConfig.preset("tiny", n_layer=2).n_layer
2
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..attention import available_backends

__all__ = ["CHOICES", "PRESETS", "GPTConfig"]

#: The allowed values of the config's design choices.
CHOICES = {
    "mlp": ("gelu", "gelu_exact", "swiglu"),
    "norm": ("layernorm", "rmsnorm"),
    "positions": ("learned", "rope"),
}


@dataclass(frozen=True)
class GPTConfig:
    """The shape and the design choices of a :class:`~maskedattn.model.GPT`.

    Sizes: V = ``vocab_size``, L = ``n_layer``, C = ``n_embd``, Hq = ``n_head``,
    Hkv = ``n_kv_head``, D = C / Hq (head dimension).
    """

    vocab_size: int = 50257
    context: int = 1024  # the longest sequence the model reads (learned position table size)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: as many as n_head (no grouped-query attention)
    n_embd: int = 768
    # "gelu": fc -> GELU, tanh form (GPT-2's "gelu_new") -> proj; "gelu_exact": the erf form
    # (PyTorch's default, nanoGPT, GPT-2 configs with "gelu"); "swiglu": SiLU(gate) * up -> proj
    mlp: str = "gelu"
    mlp_hidden: int | None = None  # None: 4C for gelu, LLaMA's 8C/3 rounded up to 64 for swiglu
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    positions: str = "learned"  # "learned" (GPT-2's table) or "rope" (rotary, LLaMA)
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    # ^ None, or transformers' rope parameters: {"rope_type": "linear" | "llama3", "factor": ...}
    bias: bool = True  # biases in every linear layer and in LayerNorm
    qkv_bias: bool | None = None  # biases on the q, k, v projection; None: as `bias` (Qwen2: True)
    window: int | None = None  # sliding-window attention over the last `window` positions (Mistral)
    tie_weights: bool = True  # the LM head reuses the token embedding matrix
    init_std: float = 0.02
    attn_backend: str = "auto"  # passed to maskedattn.attention(backend=...)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig: {name} must be one of {allowed}, got"
                                 f" {getattr(self, name)!r}")
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        _check_positive_int("n_kv_head", self.n_kv_head)
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", self._default_mlp_hidden())
        _check_positive_int("mlp_hidden", self.mlp_hidden)
        # The rows of the largest matrices (embeddings, position table, fused q|k|v, the MLP's
        # up projection) times their width: torch cannot even describe a tensor beyond this.
        widest = max(self.vocab_size, self.context, 3 * self.n_embd, 2 * self.mlp_hidden)
        if widest * self.n_embd > MAX_ELEMENTS:
            raise ValueError(f"GPTConfig: a weight matrix of {widest} x {self.n_embd} elements"
                             f" is too large for any tensor (at most 2**59 elements)")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
                " (each head gets n_embd / n_head dimensions)"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head}"
                " (grouped-query attention shares each key/value head among n_head / n_kv_head"
                " query heads)"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(
                f"GPTConfig: rotary positions need an even head dimension, got"
                f" n_embd / n_head = {self.head_dim}"
            )
        for name in ("norm_eps", "rope_base", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"GPTConfig: {name} must be a positive number, finite, got"
                                 f" {value!r}")
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.bias)
        if self.window is not None:
            _check_positive_int("window", self.window)
        if self.rope_scaling is not None:
            from .rope import check_scaling

            check_scaling(self.rope_scaling)
        for name in ("bias", "qkv_bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTConfig: {name} must be True or False, got"
                                f" {getattr(self, name)!r}")
        if self.attn_backend not in ("auto", *available_backends()):
            raise ValueError(f"GPTConfig: attn_backend must be 'auto' or one of"
                             f" {available_backends()}, got {self.attn_backend!r}")

    def _default_mlp_hidden(self) -> int:
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        # SwiGLU has three matrices instead of two: 2/3 of 4C keeps the parameter count.
        return -(-(8 * self.n_embd // 3) // 64) * 64

    @property
    def head_dim(self) -> int:
        """D, the width of one attention head."""
        return self.n_embd // self.n_head

    # -- presets and serialisation -------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named configuration (one of :data:`PRESETS`), with some fields replaced.

        Derived fields (``n_kv_head``, ``mlp_hidden``) follow overridden sizes unless they are
        overridden too.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-friendly dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build a config from :meth:`to_dict`'s output; unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"GPTConfig.from_dict wants a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"GPTConfig has no field(s) {unknown}")
        return cls(**d)


# Each size must fit torch's 32-bit index arithmetic in some kernels; a product of two such
# sizes (a weight matrix's element count) then still fits in 64 bits.
MAX_SIZE = 2**31 - 1
MAX_ELEMENTS = 2**59  # its bytes, even in float64, fit in a signed 64-bit size


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ValueError(f"GPTConfig: {name} must be an integer >= 1 and <= 2**31 - 1,"
                         f" got {value!r}")


# Fields that differ from the defaults, per preset name.
PRESETS: dict[str, dict[str, Any]] = {
    # Bytes in, a few layers: trains in minutes on a laptop CPU, used by tests and the demo.
    "tiny": dict(vocab_size=256, context=256, n_layer=4, n_head=4, n_embd=128),
    "gpt2": {},  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1.56B
    # The modern recipe at GPT-2 small's width: rotary positions, RMSNorm, SwiGLU,
    # grouped-query attention (4 kv heads for 12 query heads), no biases, untied LM head.
    "llama-style": dict(
        vocab_size=32000, context=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
        mlp="swiglu", norm="rmsnorm", positions="rope", bias=False, tie_weights=False,
    ),
}
