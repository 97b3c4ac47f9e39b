"""Ring attention: one sequence spread over the ranks of a ``torch.distributed`` group.

Each of the N ranks holds a slice of the sequence's queries, keys and values. The key/value
blocks travel around the ring (rank r sends to r + 1 and receives from r - 1) by point-to-point
messages; while one block is in flight the rank computes attention of its queries against the
block it holds, with any local backend (``attention(..., return_lse=True)``). The partial
outputs merge exactly through their log-sum-exps::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

The backward (:class:`_RingAttention`) sends the key/value blocks around again, together with
the gradient of each block's keys and values, which every rank it visits adds to; the last
rank that reads a block sends the finished gradient straight back to its owner. Each pair's
gradients come from the local flash backward operator (:func:`.ops.flash_backward`) given the
*merged* output and LSE, so no pair's forward is recomputed, and the backward holds only q, k,
v, the output, the LSE and its gradient of the shard, plus the blocks in flight. Messages land
in buffers reused from step to step; pairs run in pieces of query rows where that is exact, so
the operator's temporaries stay a fraction of a chunk.

Layouts: the sequence is cut into chunks of equal length c.

- ``"contiguous"``: N chunks, rank r holds chunk r.
- ``"zigzag"`` (default): 2N chunks, rank r holds chunks r and 2N - 1 - r. Under a causal mask
  every rank then does the same work (an early chunk with little to read, a late one with much),
  where the contiguous layout leaves rank 0 idle while rank N - 1 reads everything::

      chunks   0 1 2 3 4 5 6 7        N = 4, zigzag
      rank     0 1 2 3 3 2 1 0

Masks are written for the *whole* sequence (global positions): ``Causal()``, ``SlidingWindow``,
``PrefixLM``, ``ChunkedCausal(n)`` (served as documents whose ids are position // n),
``Padding(lengths)`` and ``Documents(ids)`` with ``ids`` of shape (B or 1, T), and their
combinations. Each (query chunk, key chunk) pair is classified once from the rule
(:meth:`MaskRule.classify` on chunk-sized tiles): empty pairs are skipped, and a block is sent
on only while some rank further along the ring will read it (a sliding window stops its blocks
after a hop or two; causal blocks never wrap around to the ranks before their owner).

Each pair is one call of the local backend in that backend's own coordinates, where queries sit
at the end of the keys. A pair whose queries come after its keys and that needs a mask is laid
out as a *frame*: the keys followed by c hidden placeholder keys, so that the queries sit c
positions after the real keys; a window then becomes a narrower window, documents compare the
keys' ids with the queries' ids, and Alibi's distances shift by a constant per head, which
leaves the probabilities unchanged and shifts the LSE by that constant (added back). The
placeholders are hidden by ``Padding``, so the backends skip their tiles.

Not served (a clear error says so): dense masks and bias tensors (not positional), Alibi when
queries read keys after them (bidirectional masks across chunks), Tq != Tk, and dtypes or
devices the flash operators do not compute (float64; devices other than CPU and CUDA).
Sequence lengths not divisible by the number of chunks: :func:`shard` pads with zeros at the end
and ``seq_len=`` tells :func:`ring_attention` to hide the padded keys; :func:`gather` trims them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .api import attention
from .lowering import lower_call, op_args
from .masks import (
    Alibi,
    Causal,
    Documents,
    Mask,
    MaskRule,
    Padding,
    PrefixLM,
    SlidingWindow,
    TileKind,
    as_rule,
)

__all__ = ["RingStats", "chunks_of", "gather", "positions", "ring_attention", "shard"]

_LAYOUTS = ("zigzag", "contiguous")
# Message tags: key/value blocks, gradients passed along the ring, finished gradients going home
# (gloo matches by tag, so a message can never land in the wrong buffer).
_BLOCK, _GRAD, _HOME = 1, 2, 3
# The backward computes each pair in up to this many pieces of query rows (and half as many of
# keys, where no position matters): see _pieces. Eighths would save another 30 MiB per rank at
# N = 2 (T = 32768, BENCHMARKS.md) but cost 5-7% more backward time: pieces of 512-1024 rows.
_PIECES = 4


@dataclass
class RingStats:
    """What one or more ring attention calls did on this rank (pass ``stats=`` to fill it).

    ``wait_s`` is time spent blocked on messages after the block's compute was done: the part
    of the communication that compute did not hide.
    """

    compute_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    pairs_computed: int = 0
    pairs_skipped: int = 0
    steps: list[int] = field(default_factory=list)


# -- layout ------------------------------------------------------------------------------------


def chunks_of(rank: int, world: int, layout: str = "zigzag") -> tuple[int, ...]:
    """The global chunk indices held by ``rank``, in the order they sit in its local tensor."""
    _check_layout(layout)
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def _n_chunks(world: int, layout: str) -> int:
    return 2 * world if layout == "zigzag" else world


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ring attention needs torch.distributed initialised"
                         " (dist.init_process_group, or launch with torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: Tensor, dim: int, *, group=None, layout: str = "zigzag") -> Tensor:
    """This rank's part of the whole sequence ``x`` along ``dim``.

    A length that is not a multiple of the number of chunks (N, or 2N for zigzag) is padded
    with zeros at the end first; pass the true length as ``seq_len`` to :func:`ring_attention`
    and :func:`gather`.
    """
    rank, world = _group_info(group)
    n = _n_chunks(world, layout)
    t = x.shape[dim]
    pad = -t % n
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim)
    parts = x.chunk(n, dim)
    return torch.cat([parts[i] for i in chunks_of(rank, world, layout)], dim)


def gather(x: Tensor, dim: int, *, group=None, layout: str = "zigzag",
           seq_len: int | None = None) -> Tensor:
    """The whole sequence from every rank's part (the inverse of :func:`shard`; no autograd)."""
    _, world = _group_info(group)
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x, group=group)
    per_rank = len(chunks_of(0, world, layout))
    ordered: list[Tensor | None] = [None] * _n_chunks(world, layout)
    for r, piece in enumerate(pieces):
        for chunk, part in zip(chunks_of(r, world, layout), piece.chunk(per_rank, dim),
                               strict=True):
            ordered[chunk] = part
    whole = torch.cat(ordered, dim)
    return whole if seq_len is None else whole.narrow(dim, 0, seq_len)


def positions(seq_len: int, *, group=None, layout: str = "zigzag",
              device: torch.device | None = None) -> Tensor:
    """The global position of each of this rank's tokens, (T_local,): for RoPE and embeddings."""
    return shard(torch.arange(seq_len, device=device), 0, group=group, layout=layout)


# -- the plan: which chunk pairs are read, which blocks travel --------------------------------


@dataclass(eq=False)
class _Plan:
    group: object
    rank: int
    world: int
    layout: str
    chunk: int  # c, positions per chunk
    rule: MaskRule  # over the global (padded) sequence
    kinds: list[list[int]]  # [query chunk][key chunk]: EMPTY / PARTIAL / FULL over all rows
    bias: Alibi | None
    softcap: float | None
    scale: float | None
    backend: str
    flash: str  # the flash operators whose backward serves every pair: "tiled" or "triton"
    stats: RingStats | None

    def reads(self, dst: int, src: int) -> bool:
        """Whether the queries of rank ``dst`` read any key of rank ``src``."""
        return any(self.kinds[qc][kc] != TileKind.EMPTY
                   for qc in chunks_of(dst, self.world, self.layout)
                   for kc in chunks_of(src, self.world, self.layout))

    @functools.cached_property
    def _last_steps(self) -> list[int]:
        return [max((t for t in range(self.world) if self.reads((src + t) % self.world, src)),
                    default=0) for src in range(self.world)]

    def last_step(self, src: int) -> int:
        """The last ring step at which a rank reads the block of ``src`` (0: only its owner)."""
        return self._last_steps[src]

    def forwards(self, src: int, step: int) -> bool:
        """Whether the holder of ``src``'s block at ``step`` sends it on to the next rank."""
        return self.last_step(src) > step

    @property
    def steps(self) -> int:
        return 1 + max(self._last_steps)

    def peer(self, r: int) -> int:
        """The global rank of rank ``r`` of the group (what point-to-point messages name)."""
        return dist.get_global_rank(self.group, r) if self.group is not None else r


def _make_plan(q: Tensor, k: Tensor, v: Tensor, mask, group, bias, softcap, scale, layout,
               seq_len, backend, stats) -> _Plan:
    _check_layout(layout)
    rank, world = _group_info(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"ring_attention: {name} must be a 4-d tensor (B, H, T_local, D),"
                             f" got {got}")
    t_local = q.shape[2]
    if k.shape[2] != t_local or v.shape[2] != t_local:
        raise ValueError(f"ring_attention: q, k and v must hold the same positions (self-"
                         f"attention), got Tq={t_local}, Tk={k.shape[2]}, Tv={v.shape[2]}")
    per_rank = len(chunks_of(rank, world, layout))
    if t_local % per_rank:
        raise ValueError(f"ring_attention: the {layout} layout holds {per_rank} chunks per rank,"
                         f" so T_local must be a multiple of {per_rank}, got {t_local}"
                         " (use shard(), which pads)")
    total = t_local * world
    rule = as_rule(mask)
    if rule.dense is not None:
        raise ValueError("ring_attention: dense masks are not positional; use Causal(),"
                         " SlidingWindow, PrefixLM, Padding and Documents")
    if bias is not None and not isinstance(bias, Alibi):
        raise ValueError("ring_attention: only Alibi biases are served (a bias tensor is not"
                         " positional)")
    if rule.window is not None and not rule.causal:
        raise ValueError("ring_attention: a window without causality is not served")
    # The backward's operators follow the forward's backend when it names triton (on CUDA, or
    # on CPU tensors under Triton's interpreter); else the device's own.
    flash = "triton" if backend == "triton" else {"cpu": "tiled", "cuda": "triton"}.get(
        q.device.type)
    if flash is None or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"ring_attention: serves float32, bfloat16 and float16 on CPU and CUDA"
                         f" (its backward runs the flash operators), got {q.dtype} on"
                         f" {q.device.type}")
    if rule.documents is not None:
        ids = rule.documents
        if ids.shape[1] > total or (seq_len is None and ids.shape[1] != total):
            raise ValueError(f"ring_attention: Documents ids must cover the whole sequence,"
                             f" shape (B, {seq_len or total}), got {tuple(ids.shape)}")
        if ids.shape[1] < total:  # padded positions: a document of their own
            ids = torch.nn.functional.pad(ids, (0, total - ids.shape[1]), value=-1)
        rule = dataclasses.replace(rule, documents=ids.to(q.device))
    if rule.chunk is not None:
        # ChunkedCausal(n): chunks of n positions are documents with ids global position // n.
        chunk_ids = (torch.arange(total, device=q.device) // rule.chunk)[None]
        rule = dataclasses.replace(rule, chunk=None) & MaskRule(documents=chunk_ids)
    if seq_len is not None:
        if not 1 <= seq_len <= total:
            raise ValueError(f"ring_attention: seq_len must be in [1, {total}], got {seq_len}")
        if seq_len < total:
            rule = rule & MaskRule(lengths=torch.tensor([seq_len], device=q.device))
    rule = rule.to(q.device)
    c = t_local // per_rank
    kinds = rule.classify(total, total, c, c)  # (Bm, Hm, n, n)
    kinds = kinds.flatten(0, 1).amin(0), kinds.flatten(0, 1).amax(0)
    # A pair is empty only if it is empty in every row, full only if full in every row.
    table = torch.where(kinds[1] == TileKind.EMPTY, TileKind.EMPTY,
                        torch.where(kinds[0] == TileKind.FULL, TileKind.FULL, TileKind.PARTIAL))
    plan = _Plan(group, rank, world, layout, c, rule, table.tolist(),
                 Alibi(bias.slopes.to(q.device, torch.float32)) if bias is not None else None,
                 softcap, scale, backend, flash, stats)
    if plan.bias is not None and not rule.causal:
        n = _n_chunks(world, layout)
        if any(plan.kinds[qc][kc] != TileKind.EMPTY for qc in range(n) for kc in range(qc + 1, n)):
            raise ValueError("ring_attention: Alibi is served only when no query reads a key"
                             " after it (use a causal mask)")
    return plan


# -- one (query chunk, key chunk) pair in the local backend's coordinates ----------------------


@dataclass
class _Frame:
    """One pair as a local call: the keys and values it reads, its mask, its LSE offset."""

    k: Tensor
    v: Tensor
    mask: Mask | None
    lse_shift: Tensor | None  # (1, H, 1): the frame's LSE minus the global one (Alibi)


def _frame(k: Tensor, v: Tensor, qc: int, kc: int, plan: _Plan, n: int | None = None) -> _Frame:
    """How query chunk ``qc`` reads key chunk ``kc`` in the backend's frame (queries at the end).

    ``n``: on the diagonal, how many of the chunk's keys the call reads (``k`` and ``v`` hold
    those): a piece of the chunk's queries under a causal mask reads the keys up to its own
    end, and sits at the end of them.
    """
    c, rule, kind = plan.chunk, plan.rule, plan.kinds[qc][kc]
    qa, kb = qc * c, kc * c  # global start positions
    n = c if n is None else n
    parts: list[Mask] = []
    shift = None  # with a frame: how far the global distances exceed the frame's
    lengths = rule.lengths - kb if rule.lengths is not None else None
    if qc == kc:  # the diagonal: the backend's own frame is the global one, moved by qa
        if rule.window is not None:
            parts.append(SlidingWindow(rule.window))
        elif rule.causal:
            parts.append(Causal())
        elif rule.prefix is not None and rule.prefix - qa < n:
            parts.append(PrefixLM(max(rule.prefix - qa, 0)))
        if lengths is not None and bool((lengths < n).any()):
            parts.append(Padding(lengths.clamp(0, n)))
        if rule.documents is not None:
            parts.append(Documents(rule.documents[:, kb:kb + n]))
    elif kind != TileKind.FULL or plan.bias is not None:
        if qc < kc and rule.prefix is not None:  # queries before keys: only the prefix is read
            lengths = torch.minimum(lengths, torch.tensor(rule.prefix - kb)) \
                    if lengths is not None else torch.tensor([rule.prefix - kb])
        framed = plan.bias is not None or (
            kind != TileKind.FULL and (qc > kc or rule.documents is not None))
        if framed:
            # keys, then c hidden placeholders; the queries sit after the placeholders.
            k = torch.cat([k, torch.zeros_like(k)], 2)
            v = torch.cat([v, torch.zeros_like(v)], 2)
            shift = qa - kb - c
            if lengths is None:
                lengths = torch.tensor([c])
            if rule.window is not None and kind != TileKind.FULL:
                parts.append(SlidingWindow(rule.window - shift))
            if rule.documents is not None and kind != TileKind.FULL:
                parts.append(Documents(torch.cat([rule.documents[:, kb:kb + c],
                                                  rule.documents[:, qa:qa + c]], 1)))
        if lengths is not None and (framed or bool((lengths < c).any())):
            parts.append(Padding(lengths.clamp(0, c)))
    mask = None
    for p in parts:
        mask = p if mask is None else mask & p
    # Alibi in the frame sees distances shorter by `shift`: the same probabilities, an LSE
    # larger by slope * shift.
    lse_shift = plan.bias.slopes[None, :, None] * shift \
        if shift is not None and plan.bias is not None else None
    return _Frame(k, v, mask, lse_shift)


def _pair(q: Tensor, k: Tensor, v: Tensor, qc: int, kc: int, plan: _Plan) -> tuple[Tensor, Tensor]:
    """Attention of query chunk ``qc`` against key chunk ``kc``: (output, lse), exact."""
    f = _frame(k, v, qc, kc, plan)
    out, lse = attention(q, f.k, f.v, f.mask, bias=plan.bias, softcap=plan.softcap,
                         scale=plan.scale, backend=plan.backend, return_lse=True)
    return out, (lse if f.lse_shift is None else lse - f.lse_shift)


def _pieces(plan: _Plan, qc: int, kc: int) -> list[tuple[slice, slice]]:
    """(query rows, keys) of the pair, in pieces where that is exact: the flash backward's
    temporaries (its gradients, its packed copies of q and d_out) then scale with a piece."""
    c, kind = plan.chunk, plan.kinds[qc][kc]
    quarters, halves = _split(c, _PIECES), _split(c, _PIECES // 2)
    if qc != kc and kind == TileKind.FULL and plan.bias is None:
        # No position matters. Key pieces are twice as long, as a backend call wants Tq <= Tk.
        return [(rows, keys) for keys in halves for rows in quarters]
    if qc == kc and plan.rule.causal:  # a piece of queries reads the keys up to its end
        return [(rows, slice(0, rows.stop)) for rows in quarters]
    return [(slice(0, c), slice(0, c))]


def _split(n: int, parts: int) -> list[slice]:
    cuts = [i * n // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _pair_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
                   qc: int, kc: int, plan: _Plan):
    """Yields (rows, keys, dq, dk, dv): the gradients of the pair's share of the merged
    attention (out, lse of every key), piece by piece (:func:`_pieces`).

    The flash backward recomputes the pair's probabilities as exp(s - lse) with the *merged*
    LSE, so they are already the pair's share of the whole row, and its delta = rowsum(d_out *
    out) is the merged output's: the pair's gradients, with no forward recomputed.
    """
    for rows, keys in _pieces(plan, qc, kc):
        f = _frame(k[:, :, keys], v[:, :, keys], qc, kc, plan, keys.stop if qc == kc else None)
        qi = q[:, :, rows]
        call = lower_call(qi, f.k, f.v, f.mask, bias=plan.bias, softcap=plan.softcap,
                          scale=plan.scale)
        lse_i = lse[:, :, rows] if f.lse_shift is None else lse[:, :, rows] + f.lse_shift
        dq, dk, dv = ops.flash_backward(plan.flash, d_out[:, :, rows], None, qi, f.k, f.v,
                                        out[:, :, rows], lse_i, op_args(call))
        n = keys.stop - keys.start  # a frame's placeholders get gradients too: dropped
        yield rows, keys, dq, dk[:, :, :n], dv[:, :, :n]


def _merge_into(out: Tensor, lse: Tensor, o: Tensor, l: Tensor) -> None:
    """Fold a partial (o, l) into the running (out, lse), in place, in float32."""
    new = torch.logaddexp(lse, l)
    safe = torch.where(new == -math.inf, 0.0, new)  # rows that saw nothing yet stay 0
    out.mul_(torch.exp(lse - safe)[..., None])
    out.addcmul_(o, torch.exp(l - safe)[..., None])
    lse.copy_(new)


# -- the ring ----------------------------------------------------------------------------------


def _slices(t: Tensor, n: int) -> list[Tensor]:
    return list(t.chunk(n, 2))


class _Messages:
    """Point-to-point messages of one step, started together and waited on together."""

    def __init__(self, plan: _Plan) -> None:
        self.plan, self.ops, self.works = plan, [], []

    def send(self, t: Tensor, to: int, tag: int) -> None:
        self.ops.append(dist.P2POp(dist.isend, t, self.plan.peer(to), self.plan.group, tag))
        if self.plan.stats is not None:
            self.plan.stats.bytes_sent += t.numel() * t.element_size()

    def recv(self, into: Tensor, frm: int, tag: int) -> Tensor:
        self.ops.append(dist.P2POp(dist.irecv, into, self.plan.peer(frm), self.plan.group, tag))
        return into

    def start(self) -> _Messages:
        if self.ops:
            self.works = dist.batch_isend_irecv(self.ops)
        return self

    def wait(self) -> None:
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        self.ops, self.works = [], []  # the buffers are the caller's again
        if self.plan.stats is not None:
            self.plan.stats.wait_s += time.perf_counter() - t0


class _Buffers:
    """Block-sized buffers that messages land in, reused from step to step, dropped as soon
    as no later step of this rank receives into them."""

    def __init__(self, like: tuple[Tensor, ...], dtype: torch.dtype | None = None) -> None:
        self.like, self.dtype, self.free = like, dtype, []

    def take(self) -> tuple[Tensor, ...]:
        if self.free:
            return self.free.pop()
        return tuple(torch.empty_like(t, dtype=self.dtype) for t in self.like)

    def give(self, bufs: tuple[Tensor, ...], needed: bool) -> None:
        if needed:
            self.free.append(bufs)


def _receives_block(plan: _Plan, step: int) -> bool:
    """Whether this rank receives a key/value block at ``step`` (it holds it at step + 1)."""
    r, n = plan.rank, plan.world
    return plan.forwards((r - 1 - step) % n, step)


def _receives_after(plan: _Plan, step: int) -> bool:
    return any(_receives_block(plan, s) for s in range(step + 1, plan.steps))


def _pass_block(plan: _Plan, step: int, held: tuple[Tensor, ...] | None, blocks: _Buffers):
    """Start sending the held block on and receiving the next; returns (messages, incoming)."""
    r, n = plan.rank, plan.world
    msgs = _Messages(plan)
    if held is not None and plan.forwards((r - step) % n, step):
        for t in held:
            msgs.send(t, (r + 1) % n, _BLOCK)
    incoming = None
    if _receives_block(plan, step):
        incoming = tuple(msgs.recv(t, (r - 1) % n, _BLOCK) for t in blocks.take())
    return msgs.start(), incoming


def _timed(plan: _Plan):
    class _T:
        def __enter__(self):
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            if plan.stats is not None:
                plan.stats.compute_s += time.perf_counter() - self.t0
    return _T()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan):
        r, n = plan.rank, plan.world
        mine = chunks_of(r, n, plan.layout)
        b, h, t, d = q.shape
        # The merged output and LSE, folded into in place, pair by pair.
        out = q.new_zeros(b, h, t, d, dtype=torch.float32)
        lse = q.new_full((b, h, t), -math.inf, dtype=torch.float32)
        qs, outs, lses = _slices(q, len(mine)), _slices(out, len(mine)), _slices(lse, len(mine))
        own = (k.contiguous(), v.contiguous())
        blocks = _Buffers(own)
        held: tuple[Tensor, ...] | None = own
        if plan.stats is not None:
            plan.stats.steps.append(plan.steps)
        for step in range(plan.steps):
            msgs, incoming = _pass_block(plan, step, held, blocks)
            src = (r - step) % n
            if held is not None and plan.reads(r, src):
                with _timed(plan):
                    ks, vs = _slices(held[0], len(mine)), _slices(held[1], len(mine))
                    for i, qc in enumerate(mine):
                        for j, kc in enumerate(chunks_of(src, n, plan.layout)):
                            if plan.kinds[qc][kc] == TileKind.EMPTY:
                                _count_skip(plan)
                                continue
                            o, l = _pair(qs[i], ks[j], vs[j], qc, kc, plan)
                            _merge_into(outs[i], lses[i], o, l)
                            del o, l
                            _count_pair(plan)
            msgs.wait()
            if held is not None and held is not own:
                blocks.give(held, _receives_after(plan, step))
            held = incoming
        ctx.plan = plan
        # The backward operators read the output in the inputs' dtype: cast once, kept.
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        plan: _Plan = ctx.plan
        q, k, v, out, lse = ctx.saved_tensors
        r, n = plan.rank, plan.world
        m = len(chunks_of(r, n, plan.layout))
        rows = _Rows(_slices(q, m), _slices(out, m), _slices(lse, m), _slices(d_out, m))
        dq = torch.zeros_like(q, dtype=torch.float32)
        own = (k.contiguous(), v.contiguous())
        last = plan.last_step(r)
        blocks = _Buffers(own)
        # Block-sized gradient buffers circulate: this rank's own partial first, then the
        # gradient of each block it holds; one whose message has left serves again, and this
        # rank's finished gradient comes home into one of them.
        grads = _Buffers(own, torch.float32)
        spare = _Buffers(tuple(t.narrow(2, 0, plan.chunk) for t in own), torch.float32)
        partial = tuple(t.zero_() for t in grads.take())
        mine = partial  # this rank's dk and dv when it is done
        held: tuple[Tensor, ...] | None = own
        sending, sent = None, None  # the gradient sent on last step, waited for one step later
        home = None

        def release(step: int) -> None:
            nonlocal sending, sent
            sending.wait()
            grads.give(sent, _receives_after(plan, step - 1)
                       or (home is None and last > 0 and step <= last))
            sending, sent = None, None

        for step in range(plan.steps):
            src = (r - step) % n
            # The gradient of the block held now, summed by the ranks before it; posted before
            # the next block's messages, in the order the sender sent them.
            acc, grad = None, partial
            if step > 0 and held is not None:
                acc, grad = _Messages(plan), grads.take()
                for t in grad:
                    acc.recv(t, (r - 1) % n, _GRAD)
                acc.start()
            msgs, incoming = _pass_block(plan, step, held, blocks)
            if held is not None:
                if plan.reads(r, src):
                    with _timed(plan):
                        _block_grads(plan, rows, dq, held, grad, src, acc, spare)
                elif acc is not None:
                    acc.wait()
                if sending is not None:
                    release(step)
                if plan.forwards(src, step):
                    sending, sent = _send(plan, grad, (r + 1) % n, _GRAD), grad
                elif src != r:  # the last reader: the finished gradient goes home
                    sending, sent = _send(plan, grad, src, _HOME), grad
            if step == last and step > 0:
                # This rank's finished gradient, from the last rank that reads its block, into
                # a buffer whose message has left.
                if sent is partial:
                    release(step)
                mine = grads.take()
                home = _Messages(plan)
                for t in mine:
                    home.recv(t, (r + step) % n, _HOME)
                home.start()
            msgs.wait()
            if held is not None and held is not own:
                blocks.give(held, _receives_after(plan, step))
            held = incoming
        for pending in (home, sending):
            if pending is not None:
                pending.wait()
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None


@dataclass
class _Rows:
    """This rank's query rows, per chunk: queries, merged output and LSE, output gradient."""

    q: list[Tensor]
    out: list[Tensor]
    lse: list[Tensor]
    d_out: list[Tensor]


def _send(plan: _Plan, tensors: tuple[Tensor, ...], to: int, tag: int) -> _Messages:
    msgs = _Messages(plan)
    for t in tensors:
        msgs.send(t, to, tag)
    return msgs.start()


def _block_grads(plan: _Plan, local: _Rows, dq: Tensor, held: tuple[Tensor, ...],
                 grad: tuple[Tensor, ...], src: int, acc: _Messages | None,
                 spare: _Buffers) -> None:
    """Add this rank's gradient contributions for the block of ``src``: to ``dq``, and to the
    block's ``grad``, which ``acc`` (if given) is still receiving from the previous rank.

    The first key chunk's contributions are summed apart (in chunk-sized ``spare`` buffers)
    while that message is in flight, so that it stays hidden behind their compute, then added
    to it; later chunks add straight in.
    """
    mine = chunks_of(plan.rank, plan.world, plan.layout)
    theirs = chunks_of(src, plan.world, plan.layout)
    ks, vs = _slices(held[0], len(theirs)), _slices(held[1], len(theirs))
    dks, dvs = _slices(grad[0], len(theirs)), _slices(grad[1], len(theirs))
    dqs = _slices(dq, len(mine))
    for j, kc in enumerate(theirs):
        apart: tuple[Tensor, Tensor] | None = None
        for i, qc in enumerate(mine):
            if plan.kinds[qc][kc] == TileKind.EMPTY:
                continue
            for rows, keys, gq, gk, gv in _pair_backward(
                    local.q[i], ks[j], vs[j], local.out[i], local.lse[i], local.d_out[i], qc, kc,
                    plan):
                dqs[i][:, :, rows].add_(gq)
                if acc is not None and apart is None:
                    apart = tuple(t.zero_() for t in spare.take())
                dk, dv = apart if acc is not None else (dks[j], dvs[j])
                dk[:, :, keys].add_(gk)
                dv[:, :, keys].add_(gv)
                del gq, gk, gv
        if acc is not None:
            acc.wait()
            acc = None
            if apart is not None:
                dks[j].add_(apart[0])
                dvs[j].add_(apart[1])
                spare.give(apart, True)
                apart = None
    if acc is not None:
        acc.wait()


def _count_pair(plan: _Plan) -> None:
    if plan.stats is not None:
        plan.stats.pairs_computed += 1


def _count_skip(plan: _Plan) -> None:
    if plan.stats is not None:
        plan.stats.pairs_skipped += 1


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    bias: Alibi | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    seq_len: int | None = None,
    backend: str = "auto",
    stats: RingStats | None = None,
) -> Tensor:
    """Exact attention over a sequence whose positions are spread over the ranks of ``group``.

    Args:
        q: this rank's queries, (B, Hq, T_local, D), the positions :func:`shard` gives it.
        k, v: this rank's keys and values, (B, Hkv, T_local, D); Hq % Hkv == 0 (GQA).
        mask: a positional mask over the whole sequence of T = N * T_local positions (see the
            module docstring); ``None``: every query sees every key.
        group: the process group of the ring (default: the whole world). Every rank of it
            calls with the same mask and sizes.
        bias: ``Alibi(slopes)``, in global positions.
        softcap, scale: as in :func:`maskedattn.attention`.
        layout: ``"zigzag"`` (balanced under causal masks) or ``"contiguous"``.
        seq_len: the true length when :func:`shard` padded the sequence; keys from ``seq_len``
            on are hidden.
        backend: the local backend of each block (``"auto"``: tiled on CPU, triton on CUDA).
        stats: a :class:`RingStats` to add timings and counts to.

    Returns:
        this rank's output (B, Hq, T_local, D), equal to the matching rows of ``attention()``
        on the gathered sequence. Differentiable with respect to q, k and v.
    """
    plan = _make_plan(q, k, v, mask, group, bias, softcap, scale, layout, seq_len, backend,
                      stats)
    return _RingAttention.apply(q, k, v, plan)
