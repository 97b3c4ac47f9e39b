"""The parts of a decoder block, in the order a block uses them.

Shapes: B batch, T new tokens, C model width, Hq query heads, Hkv key/value heads, D head width.

    x ─┬─ norm1 ─ CausalSelfAttention ─(+)─┬─ norm2 ─ FeedForward ─(+)─ out
       └────────────────────────────────────┘└──────────────────────────┘
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import Mask
from ..attention.kv_cache import KVCache
from . import cpu_linear, gemv, rope
from .config import GPTConfig
from .gelu import gelu

__all__ = ["Block", "CausalSelfAttention", "FeedForward", "Linear", "Positions", "RMSNorm",
           "apply_rope", "make_norm", "rope_tables"]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same results) that decodes faster on the CPU.

    A few rows at a time (one token per sequence) go through a native matrix-vector kernel
    that streams the weights at memory speed (see :mod:`maskedattn.model.gemv`); many rows in
    float32 through oneDNN's matrix product (:mod:`maskedattn.model.cpu_linear`); everything
    else is ``F.linear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if cpu_linear.serves(x, self.weight, gemv.MAX_ROWS):
            return cpu_linear.linear(x, self.weight, self.bias)
        return gemv.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, no centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # In float32: the mean of squares of bfloat16 activations loses too much.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def make_norm(config: GPTConfig) -> nn.Module:
    """The normalisation layer the config asks for, over the model width C."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(positions: Tensor, head_dim: int, base: float,
                scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for tokens at ``positions`` (Bp, T), each (Bp, 1, T, D/2).

    Pair i of a head (dimensions i and i + D/2) turns by ``position * base^(-2i/D)``: fast
    for the first pairs, slow for the last, so q·k depends on the distance between tokens.
    ``scaling`` rescales those frequencies for long-context checkpoints (see :mod:`.rope`).
    Computed in float32 on the fly, so that casting the model never rounds the angles.
    """
    inv_freq = rope.inv_freq(head_dim, base, scaling, positions.device)
    angles = positions[:, None, :, None].float() * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + D/2]) of x (B, H, T, D) by the angles of ``rope_tables``.

    The "rotate half" layout of Hugging Face's LLaMA, so its checkpoints load unpermuted.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


@dataclass(frozen=True)
class Positions:
    """Where a forward pass's new tokens sit and what they may see; shared by every layer."""

    index: Tensor  # (B, T) or (1, T): the position of each new token in its row
    mask: Mask | None  # which keys each query sees, for maskedattn.attention
    n_keys: int  # keys to attend over: T, or with a cache the longest row's length after the step
    rope: tuple[Tensor, Tensor] | None  # cos, sin of rotary positions, (B or 1, 1, T, D/2)
    # How every layer attends, (q, k, v) -> output under ``mask``: an AttentionPlan, lowered
    # once for all the layers of the step, or ring attention across processes.
    attend: Callable[[Tensor, Tensor, Tensor], Tensor]


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention with a fused QKV projection and an optional KV cache."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        kv_width = self.n_kv_head * self.head_dim
        # One matrix for q, k and v: one matmul instead of three.
        self.qkv = Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.qkv_bias)
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor, pos: Positions, cache: KVCache | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        b, t, c = x.shape
        d = self.head_dim
        q, k, v = self.qkv(x).split([c, self.n_kv_head * d, self.n_kv_head * d], dim=-1)
        q = q.view(b, t, self.n_head, d).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(b, t, self.n_kv_head, d).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.n_kv_head, d).transpose(1, 2)
        if pos.rope is not None:
            q, k = apply_rope(q, *pos.rope), apply_rope(k, *pos.rope)
        if cache is not None:
            k, v = cache.update(pos.index, k, v)
            k, v = k[:, :, : pos.n_keys], v[:, :, : pos.n_keys]  # (B, Hkv, n_keys, D)
        y = pos.attend(q, k, v)  # (B, Hq, T, D)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """The per-token network: GELU (GPT-2's tanh form, or the exact erf form) or SwiGLU (LLaMA,
    Shazeer 2020)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.approximate = "tanh" if config.mlp == "gelu" else "none"
        hidden = config.mlp_hidden
        # SwiGLU's gate and up projections are fused into one matrix, as q, k and v are.
        self.fc = Linear(config.n_embd, 2 * hidden if self.swiglu else hidden,
                            bias=config.bias)
        self.proj = Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = gelu(h, self.approximate)
        return self.proj(h)


class Block(nn.Module):
    """One pre-norm transformer block: attention then feed-forward, each inside a residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = FeedForward(config)

    def forward(self, x: Tensor, pos: Positions, cache: KVCache | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.norm1(x), pos, cache)
        return x + self.mlp(self.norm2(x))
