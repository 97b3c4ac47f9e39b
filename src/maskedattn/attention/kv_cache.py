"""A static key/value cache for decoding: preallocated once, written in place, never reallocated.

During generation every new token's keys and values are computed once and kept; the next
token's query attends over all of them. One :class:`KVCache` serves one attention layer::

    cache = KVCache(batch_size=2, kv_heads=4, max_len=1024, head_dim=64)
    k_all, v_all = cache.update(positions, k, v)       # positions (B, T): where each row writes
    out = attention(q, k_all[:, :, :n], v_all[:, :, :n], Causal() & Padding(lengths))

Each batch row writes at its own positions, so prompts of different lengths decode side by side;
the ``Padding`` mask keeps every row from reading past its own length.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    The buffers ``k`` and ``v`` have shape (B, Hkv, S, D) with S = ``max_len``: only the Hkv
    key/value heads are stored (with grouped-query attention they are shared by Hq / Hkv query
    heads each). They start as zeros, so positions never written hold finite values.
    """

    def __init__(self, batch_size: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        for name, n in (("batch_size", batch_size), ("kv_heads", kv_heads),
                        ("max_len", max_len), ("head_dim", head_dim)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"KVCache: {name} must be an integer >= 1, got {n!r}")
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        """S, the number of positions the cache holds."""
        return self.k.shape[2]

    def update(self, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys and values, then return the whole cache.

        Args:
            positions: (B, T) or (1, T) integer tensor: the position at which each of the T new
                tokens of each row is written, each in [0, max_len). Rows may differ.
            k, v: (B, Hkv, T, D), the new tokens' keys and values.

        Returns:
            the buffers ``(k, v)``, (B, Hkv, S, D); the caller reads the first n positions
            (``k[:, :, :n]``), n being the longest row's length.

        Raises ``ValueError`` for a shape that does not fit the cache or a position outside
        [0, max_len), ``TypeError`` for a dtype other than the cache's.
        """
        b, h, _, d = self.k.shape
        t = k.shape[2] if k.dim() == 4 else -1
        for name, new in (("k", k), ("v", v)):
            if new.shape != (b, h, t, d):
                raise ValueError(
                    f"KVCache.update: {name} must have shape (B, Hkv, T, D) = ({b}, {h}, T, {d}),"
                    f" got {tuple(new.shape)}"
                )
            if new.dtype != self.k.dtype:
                raise TypeError(f"KVCache.update: {name} has dtype {new.dtype}, the cache holds"
                                f" {self.k.dtype}")
        if positions.dim() != 2 or positions.shape[0] not in (1, b) or positions.shape[1] != t:
            raise ValueError(
                f"KVCache.update: positions must have shape (B, T) = ({b}, {t}) or (1, {t}), got"
                f" {tuple(positions.shape)}"
            )
        positions = positions.long()
        try:
            self._write(positions, k, v)
        except (IndexError, RuntimeError) as err:
            if bool(((positions < 0) | (positions >= self.max_len)).any()):
                raise ValueError(f"KVCache.update: positions must lie in [0, {self.max_len})"
                                 f" (max_len), got {positions.tolist()}") from err
            raise
        return self.k, self.v

    def _write(self, positions: Tensor, k: Tensor, v: Tensor) -> None:
        # Both ways refuse a position outside [0, max_len) (advanced indexing would wrap a
        # negative one around). One row of positions serves every batch row (decoding one
        # sequence, prefill): index_copy_, in half the time of a scatter.
        if positions.shape[0] == 1:
            self.k.index_copy_(2, positions[0], k)
            self.v.index_copy_(2, positions[0], v)
            return
        index = positions[:, None, :, None].expand(k.shape)
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
