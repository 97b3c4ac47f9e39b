"""``GPT``: token embeddings, a stack of blocks, a final norm and the language-model head.

>>> import torch
>>> model = GPT(GPTConfig.preset("tiny"))
>>> out = model(torch.tensor([[72, 105, 33]]))
>>> out.logits.shape
torch.Size([1, 3, 256])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import AttentionPlan, Causal, DenseMask, Documents, Padding, SlidingWindow
from ..attention.kv_cache import KVCache
from .config import GPTConfig
from .layers import Block, Linear, Positions, make_norm, rope_tables

__all__ = ["GPT", "GPTOutput"]

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss (PyTorch's default)


class GPTOutput(NamedTuple):
    """What :meth:`GPT.forward` returns."""

    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # mean cross-entropy over the targets, when targets are given


class GPT(nn.Module):
    """A decoder-only transformer language model (GPT-2, and LLaMA-style variants)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context, config.n_embd) \
            if config.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the layers that write into the residual stream by 1/sqrt(2L), so the
        # stream's variance does not grow with depth (two residual writes per block).
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, *,
                cache: Sequence[KVCache] | None = None, start: Tensor | None = None,
                documents: Tensor | None = None) -> GPTOutput:
        """Next-token logits for every position, and the loss when ``targets`` are given.

        Args:
            tokens: (B, T) token ids.
            targets: (B, T) the ids each position should predict; ``-100`` is ignored.
            cache: one :class:`KVCache` per layer (see :meth:`new_cache`): the tokens are the
                continuation of what the cache holds, and their keys and values are added to it.
            start: (B,) with a cache: the position of each row's first new token, i.e. how many
                tokens of that row the cache holds (default: 0 for every row).
            documents: (B, T) document id of each token, for packed sequences: a token then
                attends only to earlier tokens of its own document (no cache).
        """
        hidden = self.hidden_states(tokens, cache=cache, start=start, documents=documents)
        logits = self.lm_head(hidden)
        if targets is None:
            return GPTOutput(logits, None)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got"
                             f" {tuple(targets.shape)}")
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX)
        return GPTOutput(logits, loss)

    def hidden_states(self, tokens: Tensor, *, cache: Sequence[KVCache] | None = None,
                      start: Tensor | None = None, documents: Tensor | None = None) -> Tensor:
        """The final-normed hidden states (B, T, C) that :attr:`lm_head` turns into logits.

        Same arguments as :meth:`forward`. Generation calls it directly to project only the
        positions it samples from.
        """
        pos = self._positions(tokens, cache, start, documents)
        x = self.wte(tokens)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos.index)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, None if cache is None else cache[i])
        return self.norm(x)

    def _positions(self, tokens: Tensor, cache: Sequence[KVCache] | None,
                   start: Tensor | None, documents: Tensor | None = None) -> Positions:
        """Check the inputs; work out positions, mask and rotary angles for every layer."""
        self._check_tokens(tokens)
        b, t = tokens.shape
        device = tokens.device
        steps = torch.arange(t, device=device)
        if cache is None:
            if start is not None:
                raise ValueError("start is only meaningful with a cache")
            if t > self.config.context:
                raise ValueError(f"tokens has T={t} positions, more than the model's context of"
                                 f" {self.config.context}")
            index, mask, n_keys = steps[None], Causal(), t
            if documents is not None:
                if documents.shape != tokens.shape:
                    raise ValueError(f"documents must have the shape of tokens"
                                     f" {tuple(tokens.shape)}, got {tuple(documents.shape)}")
                mask = Causal() & Documents(documents)
        elif documents is not None:
            raise ValueError("documents (packed sequences) cannot be combined with a cache")
        else:
            start = self._check_cache(cache, b, start, device)
            index = start[:, None] + steps  # (B, T)
            ends = start + t
            limit = min(cache[0].max_len, self.config.context)
            if torch.compiler.is_compiling():
                # Traced (torch.compile, torch.export): no data-dependent shapes, so attend over
                # the whole static cache, masked to each row's length: one graph for every step.
                n_keys = limit
                keys = torch.arange(limit, device=device)
                mask = Padding(ends) if t == 1 else DenseMask(keys <= index[:, None, :, None])
            else:
                n_keys = int(ends.max())
                if n_keys > limit:
                    raise ValueError(
                        f"start + T reaches position {n_keys}, beyond the {limit} positions that"
                        f" the cache (max_len={cache[0].max_len}) and the context"
                        f" ({self.config.context}) allow"
                    )
                if t == 1:
                    # Decoding: the query aligns with the last key, n_keys - 1, where Causal()
                    # would hide nothing; Padding stops each row at its own length.
                    mask = None if b == 1 else Padding(ends)
                elif bool((start == start[0]).all()):
                    mask = Causal()  # every row continues from the same length (e.g. prefill)
                else:
                    keys = torch.arange(n_keys, device=device)
                    mask = DenseMask(keys <= index[:, None, :, None])  # (B, 1, T, n_keys)
        if self.config.window is not None:
            mask = self._windowed(mask, index, n_keys, cache is not None)
        rope = None
        if self.config.positions == "rope":
            rope = rope_tables(index, self.config.head_dim, self.config.rope_base,
                               self.config.rope_scaling)
        return Positions(index, mask, n_keys, rope,
                         AttentionPlan(mask, backend=self.config.attn_backend))

    def _windowed(self, mask, index: Tensor, n_keys: int, cached: bool):
        """``mask`` narrowed to the config's sliding window.

        The window is measured from each query's own position. The kernels place the queries
        at the end of the keys, which holds for every row unless cached rows differ in length:
        those get the window written out densely.
        """
        window = SlidingWindow(self.config.window)
        # Traced, the cache is attended whole (queries are not at the end of its keys).
        if cached and (torch.compiler.is_compiling() or (index.shape[0] > 1
                       and not bool((index[:, -1] == index[0, -1]).all()))):
            keys = torch.arange(n_keys, device=index.device)
            query = index[:, None, :, None]
            return DenseMask((keys <= query) & (query - keys < self.config.window))
        return window if mask is None else mask & window

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point \
                or tokens.dtype == torch.bool:
            got = tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__
            raise TypeError(f"tokens must be an integer tensor of shape (B, T), got {got}")
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must have shape (B, T) with B, T >= 1, got"
                             f" {tuple(tokens.shape)}")
        if torch.compiler.is_compiling():
            return  # the id range is data: checking it would break the graph
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}) (vocab_size),"
                             f" got ids from {lo} to {hi}")

    def _check_cache(self, cache: Sequence[KVCache], batch: int, start: Tensor | None,
                     device: torch.device) -> Tensor:
        if len(cache) != self.config.n_layer:
            raise ValueError(f"cache must hold one KVCache per layer ({self.config.n_layer}), got"
                             f" {len(cache)}; make one with model.new_cache(...)")
        if cache[0].k.shape[0] != batch:
            raise ValueError(f"the cache was made for batch size {cache[0].k.shape[0]}, tokens"
                             f" have B={batch}")
        if start is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        start = torch.as_tensor(start, device=device)
        if start.shape != (batch,) or start.dtype.is_floating_point:
            raise ValueError(f"start must be an integer tensor of shape (B,) = ({batch},), got"
                             f" {start.dtype} {tuple(start.shape)}")
        if not torch.compiler.is_compiling() and bool((start < 0).any()):
            raise ValueError(f"start must be >= 0, got {start.tolist()}")
        return start.long()

    # -- utilities ---------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int | None = None, *,
                  dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> list[KVCache]:
        """One empty :class:`KVCache` per layer, for ``max_len`` positions (default: context).

        dtype and device default to the model's.
        """
        weight = self.lm_head.weight
        max_len = self.config.context if max_len is None else max_len
        return [
            KVCache(batch_size, self.config.n_kv_head, max_len, self.config.head_dim,
                    dtype=dtype or weight.dtype, device=device or weight.device)
            for _ in range(self.config.n_layer)
        ]

    def num_params(self) -> int:
        """Number of parameters; a tied embedding and LM head count once."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> GPT:
        """Load a checkpoint directory: ours, or a ``transformers`` GPT-2, Llama, Qwen2 or
        Mistral (detected; sharded weights too).

        ``dtype`` defaults to the dtype stored in the checkpoint.
        """
        from .checkpoint import load

        return load(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, *, format: str = "maskedattn",
                        tokenizer=None) -> None:
        """Write ``config.json`` and ``model.safetensors`` into the directory ``path``.

        ``format="transformers"`` writes a directory that ``transformers``' AutoModelForCausalLM
        loads: GPT-2, or Llama / Qwen2 / Mistral for llama-style models; with ``tokenizer``
        (a ``tokenizers.Tokenizer``, our ``HFTokenizer`` or a tokenizer.json path) also the
        tokenizer files, so ``pipeline("text-generation", model=path)`` runs on it.
        """
        from .checkpoint import save

        save(self, path, format=format, tokenizer=tokenizer)
