"""Which keys each query may see, and what is added to the scores.

Query alignment
---------------
Queries are aligned to the *end* of the keys: with Tq queries and Tk keys, query i sits at
position ``Tk - Tq + i``. One rule then serves training (Tq = Tk) and decoding with a KV cache
(Tq < Tk: the new queries are the last positions)::

    key positions    0  1  2  3  4  5  6  7        Tk = 8
    query rows                      0  1  2        Tq = 3, offset = Tk - Tq = 5
                                    |  |  |
                         positions  5  6  7

    causal, Tq = 3:   keys 0 1 2 3 4 5 6 7
           query 0 (pos 5)  x x x x x x . .
           query 1 (pos 6)  x x x x x x x .
           query 2 (pos 7)  x x x x x x x x

Masks
-----
``Causal()``, ``SlidingWindow(w)``, ``ChunkedCausal(n)``, ``Padding(lengths)``,
``Documents(ids)``, ``PrefixLM(n)`` and
``DenseMask(tensor)`` are declarative specs, combined with ``&`` (a key is visible when every
part allows it). Each reduces to one :class:`MaskRule`, which answers the two questions every
backend asks: the dense boolean mask for a rectangle of (query, key) positions, and, per tile of
positions, whether the tile is *empty* (skip it), *full* (no mask needed) or *partial*.

Scores
------
Biases are added to the scaled scores before the mask: :class:`Alibi` (a per-head linear
penalty on distance) or a dense additive tensor. The order of every step, in every backend::

    s = (q . k) * scale
    s = softcap * tanh(s / softcap)      if softcap is given
    s = s + bias                         if bias is given
    s = -inf where the mask hides the key
    p = softmax(s) over the keys         (a row with no visible key gives p = 0, output 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

import torch
from torch import Tensor

__all__ = [
    "Alibi",
    "Causal",
    "ChunkedCausal",
    "DenseMask",
    "Documents",
    "Mask",
    "MaskRule",
    "Padding",
    "PrefixLM",
    "SlidingWindow",
    "TileKind",
    "as_rule",
    "bias_block",
]


class TileKind(IntEnum):
    """What a tile of (query, key) positions holds. Ordered so that ``min`` combines masks."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


@dataclass(frozen=True, eq=False)
class MaskRule:
    """A conjunction of the mask primitives; every mask spec reduces to one.

    A key at position k is visible to a query at position q of batch row b when all hold:

    - ``causal``: k <= q
    - ``window``: q - k < window
    - ``prefix``: k <= q or k < prefix (bidirectional inside the first ``prefix`` positions)
    - ``chunk``: k // chunk == q // chunk (fixed chunks of ``chunk`` positions)
    - ``lengths``: k < lengths[b]
    - ``documents``: documents[b, q] == documents[b, k]
    - ``dense``: dense[b, h, i, j] for query row i and key column j (broadcast over b and h)
    """

    causal: bool = False
    window: int | None = None
    prefix: int | None = None
    chunk: int | None = None
    lengths: Tensor | None = None
    documents: Tensor | None = None
    dense: Tensor | None = None

    def __and__(self, other: MaskRule) -> MaskRule:
        causal = self.causal or other.causal
        window = _min_optional(self.window, other.window)
        # (k <= q or k < a) and (k <= q or k < b) == (k <= q or k < min(a, b)); causal absorbs it.
        prefix = None if causal else _min_optional(self.prefix, other.prefix)
        if None not in (self.chunk, other.chunk) and self.chunk != other.chunk:
            raise ValueError(
                f"mask: chunks of {self.chunk} and {other.chunk} positions cannot be combined;"
                " use one ChunkedCausal size"
            )
        chunk = self.chunk if self.chunk is not None else other.chunk
        lengths = _combine(self.lengths, other.lengths, torch.minimum)
        documents = _combine(self.documents, other.documents, _pair_ids)
        dense = _combine(self.dense, other.dense, torch.logical_and)
        return MaskRule(causal, window, prefix, chunk, lengths, documents, dense)

    @property
    def is_empty_rule(self) -> bool:
        """True when the rule hides nothing (no mask at all)."""
        return (
            not self.causal
            and self.window is None
            and self.prefix is None
            and self.chunk is None
            and self.lengths is None
            and self.documents is None
            and self.dense is None
        )

    @property
    def batch_size(self) -> int:
        """How many batch rows the rule distinguishes (1 when it is the same for all)."""
        sizes = [t.shape[0] for t in (self.lengths, self.documents) if t is not None]
        if self.dense is not None:
            sizes.append(self.dense.shape[0])
        return max(sizes, default=1)

    def to(self, device: torch.device) -> MaskRule:
        """The same rule with its tensors on ``device``."""
        if self.lengths is None and self.documents is None and self.dense is None:
            return self  # the usual case, and a decoding step's: no tensor to look at
        move = {
            name: t.to(device)
            for name in ("lengths", "documents", "dense")
            if (t := getattr(self, name)) is not None and t.device != device
        }
        return replace(self, **move) if move else self

    def fit(self, batch: int, heads: int, tq: int, tk: int) -> MaskRule:
        """Check the rule's tensors against a call of these sizes; expand the dense mask.

        Raises ``ValueError`` naming the part that does not fit and the shape it wanted.
        """
        if self.lengths is not None and self.lengths.shape[0] not in (1, batch):
            raise ValueError(
                f"mask: Padding has {self.lengths.shape[0]} lengths, but the batch has B={batch};"
                f" give one length per batch row, shape ({batch},)"
            )
        if self.documents is not None:
            got = tuple(self.documents.shape)
            if got[0] not in (1, batch) or got[1] != tk:
                raise ValueError(
                    f"mask: Documents ids have shape {got}, wanted ({batch}, {tk}) or (1, {tk}):"
                    f" one document id per key position (Tk={tk})"
                )
        if self.dense is None:
            return self
        got = tuple(self.dense.shape)
        want = (batch, heads, tq, tk)
        if any(g not in (1, w) for g, w in zip(got, want, strict=True)):
            raise ValueError(
                f"mask: the dense mask has shape {got}, which does not broadcast to"
                f" (B, Hq, Tq, Tk) = {want}"
            )
        return replace(self, dense=self.dense.expand(*got[:2], tq, tk))

    # -- the dense mask ------------------------------------------------------------------------

    def block(self, q_idx: Tensor, k_idx: Tensor, offset: int) -> Tensor:
        """Dense visibility for query rows ``q_idx`` and key columns ``k_idx``.

        ``offset`` is Tk - Tq: query row i sits at position ``offset + i``. Returns a bool tensor
        of shape (Bm, Hm, len(q_idx), len(k_idx)) where Bm, Hm are 1 unless the rule varies
        with the batch row or head.
        """
        q = (q_idx + offset)[:, None]
        k = k_idx[None, :]
        allowed = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q_idx.device)
        if self.causal:
            allowed &= k <= q
        if self.window is not None:
            allowed &= q - k < self.window
        if self.prefix is not None:
            allowed &= (k <= q) | (k < self.prefix)
        if self.chunk is not None:
            allowed &= k // self.chunk == q // self.chunk
        allowed = allowed[None, None]
        if self.lengths is not None:
            allowed = allowed & (k[None, None] < self.lengths[:, None, None, None])
        if self.documents is not None:
            dq = self.documents[:, q_idx + offset]
            dk = self.documents[:, k_idx]
            allowed = allowed & (dq[:, None, :, None] == dk[:, None, None, :])
        if self.dense is not None:
            allowed = allowed & self.dense[..., q_idx, :][..., k_idx]
        return allowed

    def dense_mask(self, tq: int, tk: int, device: torch.device | None = None) -> Tensor:
        """The whole (Bm, Hm, Tq, Tk) boolean mask of a call with Tq queries and Tk keys."""
        q_idx = torch.arange(tq, device=device)
        k_idx = torch.arange(tk, device=device)
        return self.block(q_idx, k_idx, tk - tq)

    # -- tiles ---------------------------------------------------------------------------------

    def classify(self, tq: int, tk: int, block_q: int, block_k: int) -> Tensor:
        """Classify every (query tile, key tile) of a call as a :class:`TileKind`.

        Tiles are ``block_q`` query rows by ``block_k`` key columns (the last ones may be
        shorter). Returns an int8 tensor of shape (Bm, Hm, ceil(Tq/block_q), ceil(Tk/block_k)).
        The answer is exact for the positional primitives and padding; for documents and dense
        masks a tile may be called partial when it is in fact full or empty, never the reverse.
        """
        device = _device_of(self)
        q_lo = torch.arange(0, tq, block_q, device=device) + (tk - tq)
        q_hi = torch.clamp(q_lo + block_q, max=tk) - 1
        k_lo = torch.arange(0, tk, block_k, device=device)
        k_hi = torch.clamp(k_lo + block_k, max=tk) - 1
        qa, qb = q_lo[:, None], q_hi[:, None]
        ka, kb = k_lo[None, :], k_hi[None, :]

        kind = torch.full((q_lo.shape[0], k_lo.shape[0]), TileKind.FULL, dtype=torch.int8,
                          device=device)
        if self.causal:  # k <= q
            kind = torch.minimum(kind, _interval_kind(full=kb <= qa, empty=ka > qb))
        if self.window is not None:  # k > q - w
            w = self.window
            kind = torch.minimum(kind, _interval_kind(full=ka > qb - w, empty=kb <= qa - w))
        if self.prefix is not None:  # k <= q or k < n
            n = self.prefix
            kind = torch.minimum(
                kind, _interval_kind(full=(kb <= qa) | (kb < n), empty=(ka > qb) & (ka >= n))
            )
        if self.chunk is not None:  # k // c == q // c
            c = self.chunk
            kind = torch.minimum(kind, _interval_kind(
                full=(qa // c == qb // c) & (ka // c == kb // c) & (qa // c == ka // c),
                empty=(kb // c < qa // c) | (ka // c > qb // c)))
        kind = kind[None, None]
        if self.lengths is not None:  # k < length[b]
            length = self.lengths[:, None, None, None]
            kind = torch.minimum(kind, _interval_kind(full=kb < length, empty=ka >= length))
        if self.documents is not None:
            kind = torch.minimum(kind, self._classify_documents(tq, tk, block_q, block_k))
        if self.dense is not None:
            kind = torch.minimum(kind, self._classify_dense(tq, tk, block_q, block_k))
        return kind

    def _classify_documents(self, tq: int, tk: int, block_q: int, block_k: int) -> Tensor:
        ids = self.documents
        q_min, q_max = _tile_min_max(ids[:, tk - tq :], block_q)
        k_min, k_max = _tile_min_max(ids, block_k)
        q_min, q_max = q_min[:, :, None], q_max[:, :, None]
        k_min, k_max = k_min[:, None, :], k_max[:, None, :]
        # Disjoint id ranges cannot share a document; a single shared id is a full tile.
        empty = (k_max < q_min) | (q_max < k_min)
        full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        return _interval_kind(full=full, empty=empty)[:, None]

    def _classify_dense(self, tq: int, tk: int, block_q: int, block_k: int) -> Tensor:
        dense = self.dense.expand(*self.dense.shape[:2], tq, tk)
        padded = _pad_to_tiles(dense.to(torch.int8), block_q, block_k, fill=-1)
        b, h = padded.shape[:2]
        tiles = padded.reshape(b, h, padded.shape[2] // block_q, block_q, -1, block_k)
        tiles = tiles.permute(0, 1, 2, 4, 3, 5).flatten(-2)
        full = (tiles != 0).all(-1)  # padding (-1) counts as visible for "full"
        empty = (tiles != 1).all(-1)  # and as hidden for "empty"
        return _interval_kind(full=full, empty=empty)


def _interval_kind(full: Tensor, empty: Tensor) -> Tensor:
    kind = torch.where(full, TileKind.FULL, TileKind.PARTIAL)
    return torch.where(empty, TileKind.EMPTY, kind).to(torch.int8)


def _tile_min_max(ids: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-tile minimum and maximum of (B, T) ids over tiles of ``block`` columns."""
    b, t = ids.shape
    n = -(-t // block)
    pad = n * block - t
    lo = torch.nn.functional.pad(ids, (0, pad), value=torch.iinfo(ids.dtype).max)
    hi = torch.nn.functional.pad(ids, (0, pad), value=torch.iinfo(ids.dtype).min)
    return lo.reshape(b, n, block).amin(-1), hi.reshape(b, n, block).amax(-1)


def _pad_to_tiles(x: Tensor, block_q: int, block_k: int, fill: int) -> Tensor:
    tq, tk = x.shape[-2:]
    pad_q = -tq % block_q
    pad_k = -tk % block_k
    return torch.nn.functional.pad(x, (0, pad_k, 0, pad_q), value=fill)


def _device_of(rule: MaskRule) -> torch.device:
    for t in (rule.lengths, rule.documents, rule.dense):
        if t is not None:
            return t.device
    return torch.device("cpu")


def _min_optional(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _combine(a: Tensor | None, b: Tensor | None, op) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return op(a, b)


def _pair_ids(a: Tensor, b: Tensor) -> Tensor:
    """One id per (a, b) pair, so that equal pairs, and only they, get equal ids."""
    a, b = torch.broadcast_tensors(a, b)
    _, inverse = torch.unique(torch.stack([a, b], -1).reshape(-1, 2), dim=0, return_inverse=True)
    return inverse.reshape(a.shape)


# -- the specs users write ---------------------------------------------------------------------


class Mask:
    """Base of the mask specs. Combine specs with ``&``; a key must pass every part."""

    def rule(self) -> MaskRule:
        """This spec as a :class:`MaskRule`."""
        raise NotImplementedError

    def __and__(self, other: Mask) -> Mask:
        if isinstance(other, Tensor):
            raise TypeError(f"{self!r} & a tensor: wrap the boolean tensor as DenseMask(tensor)"
                            " to combine it with a mask spec")
        if not isinstance(other, Mask):
            return NotImplemented
        return AllOf((*_parts(self), *_parts(other)))

    def dense_mask(self, tq: int, tk: int, device: torch.device | None = None) -> Tensor:
        """The (Bm, Hm, Tq, Tk) boolean mask; True where the query sees the key."""
        return self.rule().to(device or torch.device("cpu")).dense_mask(tq, tk, device)

    def classify(self, tq: int, tk: int, block_q: int, block_k: int) -> Tensor:
        """Every tile of a Tq x Tk call as a :class:`TileKind` (see :meth:`MaskRule.classify`)."""
        return self.rule().classify(tq, tk, block_q, block_k)


def _parts(mask: Mask) -> tuple[Mask, ...]:
    return mask.parts if isinstance(mask, AllOf) else (mask,)


@dataclass(frozen=True)
class AllOf(Mask):
    """Several masks at once: a key is visible when every part allows it."""

    parts: tuple[Mask, ...]

    def rule(self) -> MaskRule:
        rule = MaskRule()
        for part in self.parts:
            rule = rule & part.rule()
        return rule

    def __repr__(self) -> str:
        return " & ".join(repr(p) for p in self.parts)


@dataclass(frozen=True)
class Causal(Mask):
    """Each query sees itself and the keys before it: k <= q."""

    def rule(self) -> MaskRule:
        return MaskRule(causal=True)


@dataclass(frozen=True)
class SlidingWindow(Mask):
    """Causal attention over the last ``w`` positions, the query's own included: q - w < k <= q."""

    w: int

    def __post_init__(self) -> None:
        if isinstance(self.w, bool) or not isinstance(self.w, int) or self.w < 1:
            raise ValueError(f"SlidingWindow: w must be an integer >= 1, got {self.w!r}")

    def rule(self) -> MaskRule:
        return MaskRule(causal=True, window=self.w)


@dataclass(frozen=True)
class PrefixLM(Mask):
    """Bidirectional inside the first ``n`` positions, causal after them: k <= q or k < n."""

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"PrefixLM: n must be an integer >= 0, got {self.n!r}")

    def rule(self) -> MaskRule:
        return MaskRule(prefix=self.n)


@dataclass(frozen=True)
class ChunkedCausal(Mask):
    """Causal inside fixed chunks of ``n`` positions (Llama 4's chunked attention):
    k <= q and k // n == q // n."""

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"ChunkedCausal: n must be an integer >= 1, got {self.n!r}")

    def rule(self) -> MaskRule:
        return MaskRule(causal=True, chunk=self.n)


class Padding(Mask):
    """Right padding: in batch row b only keys at positions < ``lengths[b]`` are visible.

    ``lengths`` has shape (B,). Queries in the padding still see the real keys, so their rows
    stay finite; ignore their outputs.
    """

    def __init__(self, lengths: Tensor | Sequence[int]) -> None:
        lengths = _as_int_tensor(lengths, "Padding: lengths")
        if lengths.dim() != 1:
            raise ValueError(
                f"Padding: lengths must have shape (B,), got shape {tuple(lengths.shape)}"
            )
        if lengths.numel() == 0:
            raise ValueError("Padding: lengths is empty; give one length per batch row")
        if not torch.compiler.is_compiling() and (lengths < 0).any():  # data: eager only
            raise ValueError(f"Padding: lengths must be >= 0, got {lengths.tolist()}")
        self.lengths = lengths

    def rule(self) -> MaskRule:
        return MaskRule(lengths=self.lengths)

    def __repr__(self) -> str:
        return f"Padding({self.lengths.tolist()})"


class Documents(Mask):
    """Packed sequences: a token sees only keys of its own document.

    ``ids`` holds one document id per key position, shape (Tk,) or (B, Tk). Combine with
    ``Causal()`` for causal attention inside each document.
    """

    def __init__(self, ids: Tensor | Sequence[int]) -> None:
        ids = _as_int_tensor(ids, "Documents: ids")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(
                f"Documents: ids must have shape (Tk,) or (B, Tk), got {tuple(ids.shape)}"
            )
        self.ids = ids

    def rule(self) -> MaskRule:
        return MaskRule(documents=self.ids)

    def __repr__(self) -> str:
        return f"Documents(shape={tuple(self.ids.shape)})"


class DenseMask(Mask):
    """An explicit boolean mask, True where the query sees the key.

    Shape broadcastable to (B, Hq, Tq, Tk), indexed by query row and key column.
    """

    def __init__(self, mask: Tensor) -> None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"DenseMask: mask must be a bool tensor, got {got}")
        if mask.is_meta:
            raise ValueError("DenseMask: the mask is on the meta device, which holds shapes but"
                             " no values; create it on the device of q")
        if mask.dim() > 4 or mask.dim() < 2:
            raise ValueError(
                "DenseMask: mask must have 2 to 4 dimensions, broadcastable to (B, Hq, Tq, Tk),"
                f" got shape {tuple(mask.shape)}"
            )
        self.mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))

    def rule(self) -> MaskRule:
        return MaskRule(dense=self.mask)

    def __repr__(self) -> str:
        return f"DenseMask(shape={tuple(self.mask.shape)})"


def _as_int_tensor(x: Tensor | Sequence[int], what: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    else:
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{what} must be a tensor or a list of integers, got"
                            f" {type(x).__name__}")
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ValueError(f"{what} must be integers that fit in int64, got {x!r:.80}"
                             f" ({err})") from None
        if t.numel() == 0:  # [] has no element to take a dtype from
            t = t.to(torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what} must hold integers, got dtype {t.dtype}")
    if t.is_meta:
        raise ValueError(f"{what} is on the meta device, which holds no values")
    return t.to(torch.int64)


_NO_MASK = MaskRule()  # frozen, so one instance serves every unmasked call


def as_rule(mask: Mask | Tensor | None) -> MaskRule:
    """Turn what ``attention(mask=...)`` accepts into a :class:`MaskRule`."""
    if mask is None:
        return _NO_MASK
    if isinstance(mask, MaskRule):
        return mask
    if isinstance(mask, Tensor):
        return DenseMask(mask).rule()
    if isinstance(mask, Mask):
        return mask.rule()
    raise TypeError(
        "mask must be None, a mask spec (Causal(), SlidingWindow(w), Padding(lengths), ...) or a"
        f" bool tensor, got {type(mask).__name__}"
    )


# -- biases added to the scores ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Alibi:
    """ALiBi (Press et al. 2022): head h adds ``-slopes[h] * |q - k|`` to its scores.

    For causal attention this is the paper's ``slope * (k - q)``; bidirectional masks see the
    same penalty on both sides. ``attention()`` takes the slopes in the precision the call
    computes in: float64 for float64 inputs, float32 otherwise.
    """

    slopes: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.slopes, Tensor) or self.slopes.dim() != 1:
            got = tuple(self.slopes.shape) if isinstance(self.slopes, Tensor) else self.slopes
            raise ValueError(f"Alibi: slopes must be a 1-D tensor of shape (Hq,), got {got}")

    @staticmethod
    def default_slopes(n_heads: int) -> Tensor:
        """The paper's geometric slopes 2^(-8/n), 2^(-16/n), ... (interleaved past a power of 2),
        in float64 (each call rounds them to its own precision)."""
        def powers(n: int) -> list[float]:
            start = 2 ** (-8 / n)
            return [start ** (i + 1) for i in range(n)]

        if n_heads & (n_heads - 1) == 0:
            return torch.tensor(powers(n_heads), dtype=torch.float64)
        closest = 2 ** math.floor(math.log2(n_heads))
        extra = powers(2 * closest)[0::2][: n_heads - closest]
        return torch.tensor(powers(closest) + extra, dtype=torch.float64)

    def block(self, q_idx: Tensor, k_idx: Tensor, offset: int) -> Tensor:
        """The bias for query rows ``q_idx`` and key columns ``k_idx``, shape (1, Hq, q, k), in
        the slopes' dtype (distances are exact integers up to 2^24 in float32)."""
        distance = ((q_idx + offset)[:, None] - k_idx[None, :]).abs().to(self.slopes.dtype)
        return -self.slopes[None, :, None, None] * distance[None, None]


def bias_block(bias: Alibi | Tensor | None, q_idx: Tensor, k_idx: Tensor, offset: int) -> Tensor:
    """The additive bias for a rectangle of rows and columns (0-d zero when there is none)."""
    if bias is None:
        return torch.zeros((), device=q_idx.device)
    if isinstance(bias, Alibi):
        return bias.block(q_idx, k_idx, offset)
    return bias[..., q_idx, :][..., k_idx]
