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
rank that reads a block sends the finished gradient straight back to its owner.

Layouts: the sequence is cut into chunks of equal length c.

- ``"contiguous"``: N chunks, rank r holds chunk r.
- ``"zigzag"`` (default): 2N chunks, rank r holds chunks r and 2N - 1 - r. Under a causal mask
  every rank then does the same work (an early chunk with little to read, a late one with much),
  where the contiguous layout leaves rank 0 idle while rank N - 1 reads everything::

      chunks   0 1 2 3 4 5 6 7        N = 4, zigzag
      rank     0 1 2 3 3 2 1 0

Masks are written for the *whole* sequence (global positions): ``Causal()``, ``SlidingWindow``,
``PrefixLM``, ``Padding(lengths)`` and ``Documents(ids)`` with ``ids`` of shape (B or 1, T), and
their combinations. Each (query chunk, key chunk) pair is classified once from the rule
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
queries read keys after them (bidirectional masks across chunks), and Tq != Tk.
Sequence lengths not divisible by the number of chunks: :func:`shard` pads with zeros at the end
and ``seq_len=`` tells :func:`ring_attention` to hide the padded keys; :func:`gather` trims them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .api import attention
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
    if rule.chunk is not None:
        raise ValueError("ring_attention: ChunkedCausal is not served yet; use Causal() with"
                         " Documents(chunk ids), which is the same mask")
    if rule.documents is not None:
        ids = rule.documents
        if ids.shape[1] > total or (seq_len is None and ids.shape[1] != total):
            raise ValueError(f"ring_attention: Documents ids must cover the whole sequence,"
                             f" shape (B, {seq_len or total}), got {tuple(ids.shape)}")
        if ids.shape[1] < total:  # padded positions: a document of their own
            ids = torch.nn.functional.pad(ids, (0, total - ids.shape[1]), value=-1)
        rule = dataclasses.replace(rule, documents=ids.to(q.device))
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
                 softcap, scale, backend, stats)
    if plan.bias is not None and not rule.causal:
        n = _n_chunks(world, layout)
        if any(plan.kinds[qc][kc] != TileKind.EMPTY for qc in range(n) for kc in range(qc + 1, n)):
            raise ValueError("ring_attention: Alibi is served only when no query reads a key"
                             " after it (use a causal mask)")
    return plan


# -- one (query chunk, key chunk) pair in the local backend's coordinates ----------------------


def _pair(q: Tensor, k: Tensor, v: Tensor, qc: int, kc: int, plan: _Plan) -> tuple[Tensor, Tensor]:
    """Attention of query chunk ``qc`` against key chunk ``kc``: (output, lse), exact."""
    c, rule, kind = plan.chunk, plan.rule, plan.kinds[qc][kc]
    qa, kb = qc * c, kc * c  # global start positions
    parts: list[Mask] = []
    shift = None  # with a frame: how far the global distances exceed the frame's
    lengths = rule.lengths - kb if rule.lengths is not None else None
    if qc == kc:  # the diagonal: the backend's own frame is the global one, moved by qa
        if rule.window is not None:
            parts.append(SlidingWindow(rule.window))
        elif rule.causal:
            parts.append(Causal())
        elif rule.prefix is not None and rule.prefix - qa < c:
            parts.append(PrefixLM(max(rule.prefix - qa, 0)))
        if lengths is not None and bool((lengths < c).any()):
            parts.append(Padding(lengths.clamp(0, c)))
        if rule.documents is not None:
            parts.append(Documents(rule.documents[:, kb:kb + c]))
        bias = plan.bias
    elif kind == TileKind.FULL and plan.bias is None:
        bias = None
    else:
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
        bias = plan.bias
    mask = None
    for p in parts:
        mask = p if mask is None else mask & p
    out, lse = attention(q, k, v, mask, bias=bias, softcap=plan.softcap, scale=plan.scale,
                         backend=plan.backend, return_lse=True)
    if shift is not None and plan.bias is not None:
        # Alibi in the frame saw distances shorter by `shift`: the same probabilities, an LSE
        # too large by slope * shift.
        lse = lse - plan.bias.slopes[None, :, None] * shift
    return out, lse


def _merge(out: Tensor | None, lse: Tensor | None, o: Tensor, l: Tensor):
    """Fold a partial (o, l) into the running (out, lse), in float32."""
    o = o.float()
    if out is None:
        return o, l
    new = torch.logaddexp(lse, l)
    safe = torch.where(new == -math.inf, 0.0, new)  # rows that saw nothing yet stay 0
    return (out * torch.exp(lse - safe)[..., None] + o * torch.exp(l - safe)[..., None], new)


def _weight(l: Tensor, lse: Tensor) -> Tensor:
    """exp(l - lse): the share of a partial in the merged row (0 where either is -inf)."""
    return torch.where(torch.isinf(lse) | torch.isinf(l), 0.0, torch.exp(l - lse))


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

    def recv(self, like: Tensor, frm: int, tag: int, dtype: torch.dtype | None = None) -> Tensor:
        t = torch.empty_like(like, dtype=dtype)
        self.ops.append(dist.P2POp(dist.irecv, t, self.plan.peer(frm), self.plan.group, tag))
        return t

    def start(self) -> _Messages:
        if self.ops:
            self.works = dist.batch_isend_irecv(self.ops)
        return self

    def wait(self) -> None:
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        if self.plan.stats is not None:
            self.plan.stats.wait_s += time.perf_counter() - t0


def _pass_block(plan: _Plan, step: int, held: tuple[Tensor, ...] | None,
                like: tuple[Tensor, ...]):
    """Start sending the held block on and receiving the next; returns (messages, incoming)."""
    r, n = plan.rank, plan.world
    msgs = _Messages(plan)
    if held is not None and plan.forwards((r - step) % n, step):
        for t in held:
            msgs.send(t, (r + 1) % n, _BLOCK)
    incoming = None
    if plan.forwards((r - 1 - step) % n, step):
        incoming = tuple(msgs.recv(t, (r - 1) % n, _BLOCK) for t in like)
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
        qs = _slices(q, len(mine))
        outs: list[Tensor | None] = [None] * len(mine)
        lses: list[Tensor | None] = [None] * len(mine)
        like = (k.contiguous(), v.contiguous())
        held: tuple[Tensor, ...] | None = like
        if plan.stats is not None:
            plan.stats.steps.append(plan.steps)
        for step in range(plan.steps):
            msgs, incoming = _pass_block(plan, step, held, like)
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
                            outs[i], lses[i] = _merge(outs[i], lses[i], o, l)
                            _count_pair(plan)
            msgs.wait()
            held = incoming
        b, h, _, d = q.shape
        c = plan.chunk
        out = torch.cat([o if o is not None else q.new_zeros(b, h, c, d, dtype=torch.float32)
                         for o in outs], 2)
        lse = torch.cat([x if x is not None else q.new_full((b, h, c), -math.inf,
                                                              dtype=torch.float32)
                         for x in lses], 2)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out: Tensor):
        plan: _Plan = ctx.plan
        q, k, v, out, lse = ctx.saved_tensors
        r, n = plan.rank, plan.world
        mine = chunks_of(r, n, plan.layout)
        m = len(mine)
        qs, outs, lses = _slices(q, m), _slices(out, m), _slices(lse.unsqueeze(-1), m)
        d_outs = _slices(d_out.float(), m)
        dq = torch.zeros_like(q, dtype=torch.float32)
        dqs = _slices(dq, m)
        like = (k.contiguous(), v.contiguous())
        held: tuple[Tensor, ...] | None = like
        pending: list[_Messages] = []  # gradients sent on, waited for one step later
        home = None
        mine_dkv = tuple(torch.zeros_like(t, dtype=torch.float32) for t in like)
        for step in range(plan.steps):
            src = (r - step) % n
            if step == plan.last_step(r) and step > 0:
                # This rank's own finished gradient arrives after the last reader's step.
                home = _Messages(plan)
                mine_dkv = tuple(home.recv(t, (r + step) % n, _HOME, torch.float32)
                                 for t in like)
                home.start()
            # The gradient of the block arriving now, summed by the ranks before; posted
            # before the next block's messages, in the order the sender sent them.
            acc = None
            if step > 0 and held is not None:
                acc = _Messages(plan)
                acc_in = tuple(acc.recv(t, (r - 1) % n, _GRAD, torch.float32) for t in like)
                acc.start()
            msgs, incoming = _pass_block(plan, step, held, like)
            if held is not None:
                dkv = tuple(torch.zeros_like(t, dtype=torch.float32) for t in like)
                if plan.reads(r, src):
                    with _timed(plan):
                        _pair_grads(plan, qs, outs, lses, d_outs, dqs, held, dkv, mine, src)
                if acc is not None:
                    acc.wait()
                    for ours, theirs in zip(dkv, acc_in, strict=True):
                        ours.add_(theirs)
                    del acc_in
                for p in pending:
                    p.wait()
                pending = []
                if plan.forwards(src, step):
                    pending.append(_send(plan, dkv, (r + 1) % n, _GRAD))
                elif src != r:
                    pending.append(_send(plan, dkv, src, _HOME))  # the last reader: home
                else:
                    mine_dkv = dkv
            msgs.wait()
            held = incoming
        if home is not None:
            home.wait()
        for p in pending:
            p.wait()
        return dq.to(q.dtype), mine_dkv[0].to(k.dtype), mine_dkv[1].to(v.dtype), None


def _send(plan: _Plan, tensors: tuple[Tensor, ...], to: int, tag: int) -> _Messages:
    msgs = _Messages(plan)
    for t in tensors:
        msgs.send(t, to, tag)
    return msgs.start()


def _pair_grads(plan, qs, outs, lses, d_outs, dqs, held, dkv, mine, src) -> None:
    """Add this rank's gradient contributions for the held block (recomputed pair by pair)."""
    n = plan.world
    theirs = chunks_of(src, n, plan.layout)
    ks, vs = _slices(held[0], len(theirs)), _slices(held[1], len(theirs))
    dks, dvs = _slices(dkv[0], len(theirs)), _slices(dkv[1], len(theirs))
    for i, qc in enumerate(mine):
        for j, kc in enumerate(theirs):
            if plan.kinds[qc][kc] == TileKind.EMPTY:
                continue
            qi, kj, vj = (t.detach().requires_grad_() for t in (qs[i], ks[j], vs[j]))
            with torch.enable_grad():
                o, l = _pair(qi, kj, vj, qc, kc, plan)
            # out = sum_b w_b o_b with w_b = exp(l_b - lse): d o_b = w_b d_out, and
            # d l_b = w_b (d_out . (o_b - out)) (the softmax over the partials).
            w = _weight(l, lses[i][..., 0])
            go = w[..., None] * d_outs[i]
            gl = w * (d_outs[i] * (o.detach().float() - outs[i])).sum(-1)
            gq, gk, gv = torch.autograd.grad((o, l), (qi, kj, vj), (go.to(o.dtype), gl))
            dqs[i] += gq
            dks[j] += gk
            dvs[j] += gv


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
