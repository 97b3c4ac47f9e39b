"""Flash attention in Triton: the kernels and their launchers (see :mod:`.ops` for the operators).

Imported lazily by :mod:`maskedattn.attention.triton` (it needs ``triton``). The algorithm is
FlashAttention-2's, in base 2:

- forward: one program per (query tile, batch, head) walks the key tiles with an online softmax
  (running row max ``m``, running row sum ``l``, the partial output rescaled by
  ``exp2(m_old - m_new)`` whenever the max grows) and stores the output and the row's
  log-sum-exp (LSE). Scores are kept in base-2 units (``log2(e)`` folded into the scale) so
  every exponential is an ``exp2``.
- decode (Tq <= 16 against a long cache): the keys are split across programs, the query
  heads that share one key/value head are packed into one tile (each key is read once per
  group), and a second kernel merges the partial outputs by their LSE.
- backward: the probabilities are recomputed from the saved LSE. One kernel owns a key tile and
  loops over the query tiles (and over the query heads of its group, for GQA) to build dK and
  dV; another owns a query tile and builds dQ. No atomics, so gradients are deterministic.

Masks never reach the kernels as a dense T x T tensor, except a user's dense mask. Each program
works out, from the mask's structure, the range of tiles that can hold a visible key and the
sub-range of tiles where every key is visible. Tiles outside the range are skipped, tiles in
the full sub-range run without any mask arithmetic, and only the tiles at the edges (the
causal diagonal, the window's edge, the padding boundary, document boundaries, the
sequence's tail) pay for the elementwise mask. ALiBi, an additive bias and the softcap are
applied inside every tile. A dense bool mask is folded into the additive bias as -inf.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import AttentionCall
from .lowering import OP_FIELDS, empty_like_heads
from .masks import Alibi, _pair_ids

LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453

# Queries per tile in the decode kernel can come from several heads; at most this many per tile.
DECODE_MAX_QUERIES = 16
_DECODE_MAX_ROWS = 64


# What each field of lowering.OP_FIELDS becomes in the kernels: their mask and score
# parameters, computed by _mask_args. Upper-case names are constexpr (a kernel variant each).
# chunk arrives as document ids, dense as -inf in the bias: no parameters of their own. In the
# order the kernels take them, not OP_FIELDS': the GPU compiler's register allocation follows
# the order of the run-time parameters (the hot loop's SASS changes with it), and this is the
# order the kernels were benchmarked with on the H100 (BENCHMARKS.md).
_LOWERED = {
    "scale": ("scale2", "s_scale", "PLAIN"),  # the backward kernels also take scale itself
    "softcap": ("softcap2", "HAS_SOFTCAP"),
    "prefix": ("prefix",),
    "window": ("window",),
    "causal": ("CAUSAL",),  # k <= q or k < prefix
    "chunk": (),
    "lengths": ("Lengths", "HAS_LENGTHS"),
    "documents": ("DocIds", "DocFirst", "DocLast", "sdb", "HAS_DOCS"),
    "dense": (),
    "alibi": ("Slopes", "ALIBI"),
    "bias": ("Bias", "sbb", "sbh", "sbq", "sbk", "HAS_BIAS"),
}


def _mask_params(fields: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """The kernels' mask and score parameters, given :data:`.lowering.OP_FIELDS`."""
    names = [name for name, _ in fields]
    if sorted(names) != sorted(_LOWERED):
        raise RuntimeError(
            f"lowering.OP_FIELDS has the fields {names}, but the Triton kernels lower"
            f" {list(_LOWERED)}: say in _triton_kernels._LOWERED what each field becomes,"
            " compute it in _mask_args and add its parameters to every kernel and tile loop"
        )
    return tuple(param for params in _LOWERED.values() for param in params)


#: Parameters that every kernel and tile loop takes as one run, in this order (checked at
#: import).
MASK_PARAMS = _mask_params(OP_FIELDS)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# -- pieces shared by every kernel -------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tl has no tanh that also runs in the interpreter; 1 - 2 / (e^2x + 1) saturates cleanly.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _load(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    """Load a tile, masking only what may fall outside the tensor (a tail, a padded head dim)."""
    if CHECK_ROWS and CHECK_D:
        x = tl.load(ptrs, mask=row_ok & d_ok, other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=row_ok, other=0.0)
    elif CHECK_D:
        x = tl.load(ptrs, mask=d_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _scores(qk, q_pos, k_pos, q_row, q_ok, k_ok, b, head, scale2, softcap2,
            Slopes, Bias, sbb, sbh, sbq, sbk,
            PLAIN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    """Scores of a tile in base-2 units; q_pos/k_pos/q_row broadcast to the tile's shape.

    PLAIN (no softcap, ALiBi or bias) returns the raw q.k: the caller folds the scale into
    the exp2's argument, one FMA per score instead of a multiply and a subtract.
    """
    if PLAIN:
        s = qk
    else:
        s = qk * scale2
        if HAS_SOFTCAP:
            s = softcap2 * _tanh(s / softcap2)
        if ALIBI:
            slope = tl.load(Slopes + head)
            s -= (slope * 1.4426950408889634) * tl.abs(q_pos - k_pos).to(tl.float32)
        if HAS_BIAS:
            ptrs = Bias + b * sbb + head * sbh + q_row * sbq + k_pos * sbk
            s += tl.load(ptrs, mask=q_ok & k_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _visible(q_pos, k_pos, q_ok, k_ok, b, prefix, window, Lengths, DocIds, sdb,
             CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Elementwise visibility of a tile, mirroring :meth:`MaskRule.block` (ChunkedCausal
    arrives as document ids, see :func:`_mask_args`); tails are invisible."""
    ok = q_ok & k_ok
    if CAUSAL:  # with PrefixLM(n): k <= q or k < n; plain causal has n = 0
        ok = ok & ((k_pos <= q_pos) | (k_pos < prefix))
    ok = ok & (q_pos - k_pos < window)  # window == Tk + 1 when there is none
    if HAS_LENGTHS:
        ok = ok & (k_pos < tl.load(Lengths + b))
    if HAS_DOCS:
        doc_q = tl.load(DocIds + b * sdb + q_pos, mask=q_ok, other=-1)
        doc_k = tl.load(DocIds + b * sdb + k_pos, mask=k_ok, other=-2)
        ok = ok & (doc_q == doc_k)
    return ok


@triton.jit
def _key_range(q_first, q_last, q_pos, q_ok, b, Tk, prefix, window, Lengths, DocFirst,
               DocLast, sdb, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
               HAS_DOCS: tl.constexpr):
    """Keys [lo, hi) that some query at positions q_first..q_last may see, and the keys
    [full_lo, full_hi) that every one of them sees (all positions in key coordinates): the
    interval formulas of :meth:`MaskRule.classify`, solved for a range of key tiles."""
    lo = tl.maximum(q_first - window + 1, 0)
    full_lo = tl.maximum(q_last - window + 1, 0)
    hi = Tk + 0 * q_first
    full_hi = Tk + 0 * q_first
    if CAUSAL:
        hi = tl.minimum(tl.maximum(q_last + 1, prefix), Tk)
        full_hi = tl.maximum(q_first + 1, prefix)
    if HAS_LENGTHS:
        n = tl.load(Lengths + b)
        hi = tl.minimum(hi, n)
        full_hi = tl.minimum(full_hi, n)
    if HAS_DOCS:
        # Every key of a query's document lies between the document's first and last position.
        lo = tl.maximum(lo, tl.min(tl.load(DocFirst + b * sdb + q_pos, mask=q_ok, other=Tk)))
        hi = tl.minimum(hi, tl.max(tl.load(DocLast + b * sdb + q_pos, mask=q_ok, other=-1)) + 1)
        full_lo = hi  # ids can change anywhere: no tile is known to be full
    return lo, hi, full_lo, full_hi


@triton.jit
def _query_range(k_first, k_last, k_pos, k_ok, b, Tq, offset, prefix, window, Lengths,
                 DocFirst, DocLast, sdb, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                 HAS_DOCS: tl.constexpr):
    """Query rows [lo, hi) that see some key at positions k_first..k_last, and the rows
    [full_lo, full_hi) that see all of them (the transpose of :func:`_key_range`)."""
    lo = 0 * k_first
    full_lo = 0 * k_first
    hi = k_last + window  # q - k < window
    full_hi = k_first + window
    if CAUSAL:  # k <= q or k < prefix
        lo = tl.where(k_first < prefix, 0, k_first)
        full_lo = tl.where(k_last < prefix, 0, k_last)
    if HAS_LENGTHS:
        n = tl.load(Lengths + b)
        hi = tl.where(k_first < n, hi, 0)
        full_hi = tl.where(k_last < n, full_hi, 0)
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.min(tl.load(DocFirst + b * sdb + k_pos, mask=k_ok, other=2**30)))
        hi = tl.minimum(hi, tl.max(tl.load(DocLast + b * sdb + k_pos, mask=k_ok, other=-1)) + 1)
        full_hi = 0 * k_first
    # Positions to query rows: row i sits at position offset + i.
    lo = tl.maximum(lo - offset, 0)
    hi = tl.minimum(hi - offset, Tq)
    full_lo = tl.maximum(full_lo - offset, 0)
    full_hi = tl.minimum(full_hi - offset, Tq)
    return lo, hi, full_lo, full_hi


@triton.jit
def _segments(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split [lo, hi) into tiles of BLOCK: [start, mid_lo) and [mid_hi, end) need the mask,
    [mid_lo, mid_hi) holds only tiles inside [full_lo, full_hi), which need none.

    lo and full_lo are >= 0; hi and full_hi may be below them (an empty range), even negative.
    Integer division truncates toward zero, so every negative bound is clamped by a max.
    """
    end = tl.maximum(hi, lo)
    start = lo // BLOCK * BLOCK
    mid_lo = tl.minimum(tl.maximum((full_lo + BLOCK - 1) // BLOCK * BLOCK, start), end)
    mid_hi = tl.maximum(tl.minimum(full_hi, end) // BLOCK * BLOCK, mid_lo)
    return start, mid_lo, mid_hi, end


@triton.jit
def _segment(seg: tl.constexpr, start, mid_lo, mid_hi, end):
    """Bounds of segment 0 (masked edge), 1 (full middle) or 2 (masked edge)."""
    if seg == 0:
        lo, hi = start, mid_lo
    elif seg == 1:
        lo, hi = mid_lo, mid_hi
    else:
        lo, hi = mid_hi, end
    return lo, hi


@triton.jit
def _query_tile(Hq, Tq, Tk, prefix, window, Lengths, DocFirst, DocLast, sdb,
                CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_DOCS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's query tile and the key segments it visits (forward and dQ kernels)."""
    # Heaviest query tiles (the last, under a causal mask) first: less idle tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1) // Hq
    offset = Tk - Tq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = rows < Tq
    q_first = offset + pid_m * BLOCK_M
    q_last = offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1
    lo, hi, full_lo, full_hi = _key_range(q_first, q_last, offset + rows, q_ok, b, Tk, prefix,
                                          window, Lengths, DocFirst, DocLast, sdb, CAUSAL,
                                          HAS_LENGTHS, HAS_DOCS)
    start, mid_lo, mid_hi, end = _segments(lo, hi, full_lo, full_hi, BLOCK_N)
    return rows, q_ok, start, mid_lo, mid_hi, end


# Sizes and mask positions vary from call to call: compile one kernel for all their values.
_LENGTHS = ["Tq", "Tk", "prefix", "window", "size_class"]


# -- forward -----------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, skt, skd, svt, svd, start, end,
               q_pos, q_row, q_ok, b, head, Tk,
               # MASK_PARAMS, in its order (checked at import):
               scale2, s_scale, PLAIN: tl.constexpr, softcap2, HAS_SOFTCAP: tl.constexpr,
               prefix, window, CAUSAL: tl.constexpr, Lengths, HAS_LENGTHS: tl.constexpr,
               DocIds, DocFirst, DocLast, sdb, HAS_DOCS: tl.constexpr,
               Slopes, ALIBI: tl.constexpr, Bias, sbb, sbh, sbq, sbk, HAS_BIAS: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr):
    """Online softmax over the key tiles starting in [start, end)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kt_ptrs = K + offs_d[:, None] * skd + (start + offs_n)[None, :] * skt
    v_ptrs = V + (start + offs_n)[:, None] * svt + offs_d[None, :] * svd
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        k_ok = k_pos < Tk
        kt = _load(kt_ptrs, k_ok[None, :], d_ok[:, None], MASKED, BLOCK_D != HEAD_DIM)
        qk = tl.dot(q, kt)
        s = _scores(qk, q_pos, k_pos[None, :], q_row, q_ok, k_ok[None, :], b, head, scale2,
                    softcap2, Slopes, Bias, sbb, sbh, sbq, sbk, PLAIN, HAS_SOFTCAP, ALIBI,
                    HAS_BIAS)
        if MASKED:
            vis = _visible(q_pos, k_pos[None, :], q_ok, k_ok[None, :], b, prefix, window,
                           Lengths, DocIds, sdb, CAUSAL, HAS_LENGTHS, HAS_DOCS)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * s_scale)
        # A row that has seen no visible key yet has m = -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out: its p and alpha come out as 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * s_scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_ptrs, k_ok[:, None], d_ok[None, :], MASKED, BLOCK_D != HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        kt_ptrs += BLOCK_N * skt
        v_ptrs += BLOCK_N * svt
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_LENGTHS)
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                sob, soh, sot, sod, Hq, group, Tq, Tk,
                # MASK_PARAMS, in its order (checked at import):
                scale2, s_scale, PLAIN: tl.constexpr, softcap2, HAS_SOFTCAP: tl.constexpr,
                prefix, window, CAUSAL: tl.constexpr, Lengths, HAS_LENGTHS: tl.constexpr,
                DocIds, DocFirst, DocLast, sdb, HAS_DOCS: tl.constexpr,
                Slopes, ALIBI: tl.constexpr, Bias, sbb, sbh, sbq, sbk, HAS_BIAS: tl.constexpr,
                size_class,  # only a key for autotuning
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    rows, q_ok, start, mid_lo, mid_hi, end = _query_tile(
        Hq, Tq, Tk, prefix, window, Lengths, DocFirst, DocLast, sdb, CAUSAL, HAS_LENGTHS,
        HAS_DOCS, BLOCK_M, BLOCK_N)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    q_pos = Tk - Tq + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :] * sqd,
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    Kh = K + b * skb + (h // group) * skh
    Vh = V + b * svb + (h // group) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for seg in tl.static_range(3):  # masked edge, full middle, masked edge
        seg_lo, seg_hi = _segment(seg, start, mid_lo, mid_hi, end)
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, Kh, Vh, skt, skd, svt, svd, seg_lo, seg_hi,
            q_pos[:, None], rows[:, None], q_ok[:, None], b, h, Tk,
            scale2, s_scale, PLAIN, softcap2, HAS_SOFTCAP, prefix, window, CAUSAL,
            Lengths, HAS_LENGTHS, DocIds, DocFirst, DocLast, sdb, HAS_DOCS,
            Slopes, ALIBI, Bias, sbb, sbh, sbq, sbk, HAS_BIAS,
            HEAD_DIM, BLOCK_D, BLOCK_N, seg != 1)

    # A row that sees no key outputs 0 and has LSE -inf (l == 0 exactly then).
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * Tq + rows, lse, mask=q_ok)


@triton.jit(do_not_specialize=_LENGTHS)
def _decode_kernel(Q, K, V, Opart, LSEpart,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                   Hkv, group, Tq, Tk, chunk,
                   # MASK_PARAMS, in its order (checked at import):
                   scale2, s_scale, PLAIN: tl.constexpr, softcap2, HAS_SOFTCAP: tl.constexpr,
                   prefix, window, CAUSAL: tl.constexpr, Lengths, HAS_LENGTHS: tl.constexpr,
                   DocIds, DocFirst, DocLast, sdb, HAS_DOCS: tl.constexpr,
                   Slopes, ALIBI: tl.constexpr, Bias, sbb, sbh, sbq, sbk, HAS_BIAS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """One split of the keys for one key/value head; rows are (query head, query) pairs."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    q_ok = r < group * Tq
    head = kvh * group + r // Tq
    t = r % Tq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    offset = Tk - Tq
    q_pos = offset + t
    lo, hi, _, _ = _key_range(offset, Tk - 1, q_pos, q_ok, b, Tk, prefix, window, Lengths,
                              DocFirst, DocLast, sdb, CAUSAL, HAS_LENGTHS, HAS_DOCS)
    # chunk is a multiple of BLOCK_N, so no tile crosses into the next split.
    lo = tl.maximum(lo, split * chunk)
    hi = tl.minimum(hi, split * chunk + chunk)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K + b * skb + kvh * skh, V + b * svb + kvh * svh, skt, skd, svt, svd,
        lo // BLOCK_N * BLOCK_N, hi, q_pos[:, None], t[:, None], q_ok[:, None], b,
        head[:, None], Tk,
        scale2, s_scale, PLAIN, softcap2, HAS_SOFTCAP, prefix, window, CAUSAL,
        Lengths, HAS_LENGTHS, DocIds, DocFirst, DocLast, sdb, HAS_DOCS,
        Slopes, ALIBI, Bias, sbb, sbh, sbq, sbk, HAS_BIAS,
        HEAD_DIM, BLOCK_D, BLOCK_N, True)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))  # base 2
    # Partial results, laid out (split, B, Hq, Tq, ...): row (b, head, t) is (b*Hq + head)*Tq + t.
    n_rows = tl.num_programs(1) * group * Tq
    row = split * n_rows + (b * Hkv + kvh) * group * Tq + r
    tl.store(Opart + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=q_ok[:, None])
    tl.store(LSEpart + row, lse, mask=q_ok)


@triton.jit
def _merge_kernel(Opart, LSEpart, O, LSE, n_splits, Hq, Tq, sob, soh, sot, sod,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Combine the splits of one query row: weights exp(lse_s - lse), lse = logsumexp(lse_s)."""
    row = tl.program_id(0)
    n_rows = tl.num_programs(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LSEpart + offs_s * n_rows + row, mask=offs_s < n_splits,
                    other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse_s - m_safe), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(n_splits):
        w = tl.exp2(tl.load(LSEpart + s * n_rows + row) - m_safe)
        acc += w * tl.load(Opart + (s * n_rows + row) * BLOCK_D + offs_d)
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)
    lse = tl.where(seen, (m_safe + tl.log2(tl.where(seen, total, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    b = row // (Hq * Tq)
    h = row // Tq % Hq
    t = row % Tq
    tl.store(O + b * sob + h * soh + t * sot + offs_d * sod, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(LSE + row, lse)


# -- backward ----------------------------------------------------------------------------------


@triton.jit
def _delta_kernel(O, dO, dLSE, Delta, sob, soh, sot, sod, sdob, sdoh, sdot, sdod, Hq, Tq,
                  HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE: the term every dS of the row subtracts."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :] * sod, mask=ok,
                other=0.0)
    do = tl.load(dO + b * sdob + h * sdoh + rows[:, None] * sdot + offs_d[None, :] * sdod,
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:  # d lse / d s = p, so an LSE gradient enters exactly like -delta
        delta -= tl.load(dLSE + bh * Tq + rows, mask=rows < Tq, other=0.0)
    tl.store(Delta + bh * Tq + rows, delta, mask=rows < Tq)


@triton.jit
def _load_lse2(LSE, rows, ok):
    """The saved LSE in base 2; +inf for empty rows and tails, so that their p is exactly 0."""
    lse = tl.load(LSE + rows, mask=ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, dO, LSE, Delta, sqt, sqd, sdot, sdod, start, end,
                k_pos, k_ok, b, head, Tq, offset,
                # MASK_PARAMS, in its order (checked at import):
                scale2, s_scale, PLAIN: tl.constexpr, softcap2, HAS_SOFTCAP: tl.constexpr,
                prefix, window, CAUSAL: tl.constexpr, Lengths, HAS_LENGTHS: tl.constexpr,
                DocIds, DocFirst, DocLast, sdb, HAS_DOCS: tl.constexpr,
                Slopes, ALIBI: tl.constexpr, Bias, sbb, sbh, sbq, sbk, HAS_BIAS: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles starting in [start, end).

    Works on transposed scores (keys x queries), so no transpose of P or dS is needed.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qt_ptrs = Q + offs_d[:, None] * sqd + (start + offs_m)[None, :] * sqt
    do_ptrs = dO + (start + offs_m)[:, None] * sdot + offs_d[None, :] * sdod
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q_ok = rows < Tq
        qt = _load(qt_ptrs, q_ok[None, :], d_ok[:, None], MASKED, BLOCK_D != HEAD_DIM)
        do = _load(do_ptrs, q_ok[:, None], d_ok[None, :], MASKED, BLOCK_D != HEAD_DIM)
        lse2 = _load_lse2(LSE, rows, q_ok)
        qkt = tl.dot(k, qt)
        q_pos = offset + rows[None, :]
        st = _scores(qkt, q_pos, k_pos, rows[None, :], q_ok[None, :], k_ok, b, head, scale2,
                     softcap2, Slopes, Bias, sbb, sbh, sbq, sbk, PLAIN, HAS_SOFTCAP, ALIBI,
                     HAS_BIAS)
        if MASKED:
            vis = _visible(q_pos, k_pos, q_ok[None, :], k_ok, b, prefix, window, Lengths,
                           DocIds, sdb, CAUSAL, HAS_LENGTHS, HAS_DOCS)
            st = tl.where(vis, st, float("-inf"))
        pt = tl.exp2(st * s_scale - lse2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv)
        delta = tl.load(Delta + rows, mask=q_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:  # d/dx c*tanh(x/c) = 1 - tanh(x/c)^2
            th = _tanh(qkt * (scale2 / softcap2))
            dst = dst * (1.0 - th * th)
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
        qt_ptrs += BLOCK_M * sqt
        do_ptrs += BLOCK_M * sdot
    return dk, dv


@triton.jit(do_not_specialize=_LENGTHS)
def _dkdv_kernel(Q, K, V, dO, LSE, Delta, dK, dV,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                 sdob, sdoh, sdot, sdod, sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd,
                 Hq, Hkv, group, Tq, Tk, scale,
                 # MASK_PARAMS, in its order (checked at import):
                 scale2, s_scale, PLAIN: tl.constexpr, softcap2, HAS_SOFTCAP: tl.constexpr,
                 prefix, window, CAUSAL: tl.constexpr, Lengths, HAS_LENGTHS: tl.constexpr,
                 DocIds, DocFirst, DocLast, sdb, HAS_DOCS: tl.constexpr,
                 Slopes, ALIBI: tl.constexpr, Bias, sbb, sbh, sbq, sbk, HAS_BIAS: tl.constexpr,
                 size_class,  # only a key for autotuning
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    offset = Tk - Tq
    k_pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k_pos < Tk
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tile_ok = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + kvh * skh + k_pos[:, None] * skt + offs_d[None, :] * skd,
                mask=tile_ok, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + k_pos[:, None] * svt + offs_d[None, :] * svd,
                mask=tile_ok, other=0.0)
    k_first = pid_n * BLOCK_N
    k_last = tl.minimum(k_first + BLOCK_N, Tk) - 1
    lo, hi, full_lo, full_hi = _query_range(k_first, k_last, k_pos, k_ok, b, Tq, offset,
                                            prefix, window, Lengths, DocFirst, DocLast, sdb,
                                            CAUSAL, HAS_LENGTHS, HAS_DOCS)
    start, mid_lo, mid_hi, end = _segments(lo, hi, full_lo, full_hi, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # GQA: this key/value head's gradient sums over its query heads, here, without atomics.
    for g in range(group):
        h = kvh * group + g
        Qh = Q + b * sqb + h * sqh
        dOh = dO + b * sdob + h * sdoh
        row0 = (b * Hq + h) * Tq
        for seg in tl.static_range(3):
            seg_lo, seg_hi = _segment(seg, start, mid_lo, mid_hi, end)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, Qh, dOh, LSE + row0, Delta + row0, sqt, sqd, sdot, sdod,
                seg_lo, seg_hi, k_pos[:, None], k_ok[:, None], b, h, Tq, offset,
                scale2, s_scale, PLAIN, softcap2, HAS_SOFTCAP, prefix, window, CAUSAL,
                Lengths, HAS_LENGTHS, DocIds, DocFirst, DocLast, sdb, HAS_DOCS,
                Slopes, ALIBI, Bias, sbb, sbh, sbq, sbk, HAS_BIAS,
                HEAD_DIM, BLOCK_D, BLOCK_M, seg != 1)
    tl.store(dK + b * sdkb + kvh * sdkh + k_pos[:, None] * sdkt + offs_d[None, :] * sdkd,
             (dk * scale).to(dK.dtype.element_ty), mask=tile_ok)
    tl.store(dV + b * sdvb + kvh * sdvh + k_pos[:, None] * sdvt + offs_d[None, :] * sdvd,
             dv.to(dV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, K, V, skt, skd, svt, svd, start, end,
              q_pos, q_row, q_ok, b, head, Tk,
              # MASK_PARAMS, in its order (checked at import):
              scale2, s_scale, PLAIN: tl.constexpr, softcap2, HAS_SOFTCAP: tl.constexpr,
              prefix, window, CAUSAL: tl.constexpr, Lengths, HAS_LENGTHS: tl.constexpr,
              DocIds, DocFirst, DocLast, sdb, HAS_DOCS: tl.constexpr,
              Slopes, ALIBI: tl.constexpr, Bias, sbb, sbh, sbq, sbk, HAS_BIAS: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles starting in [start, end)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kt_ptrs = K + offs_d[:, None] * skd + (start + offs_n)[None, :] * skt
    vt_ptrs = V + offs_d[:, None] * svd + (start + offs_n)[None, :] * svt
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        k_ok = k_pos < Tk
        kt = _load(kt_ptrs, k_ok[None, :], d_ok[:, None], MASKED, BLOCK_D != HEAD_DIM)
        vt = _load(vt_ptrs, k_ok[None, :], d_ok[:, None], MASKED, BLOCK_D != HEAD_DIM)
        qk = tl.dot(q, kt)
        s = _scores(qk, q_pos, k_pos[None, :], q_row, q_ok, k_ok[None, :], b, head, scale2,
                    softcap2, Slopes, Bias, sbb, sbh, sbq, sbk, PLAIN, HAS_SOFTCAP, ALIBI,
                    HAS_BIAS)
        if MASKED:
            vis = _visible(q_pos, k_pos[None, :], q_ok, k_ok[None, :], b, prefix, window,
                           Lengths, DocIds, sdb, CAUSAL, HAS_LENGTHS, HAS_DOCS)
            s = tl.where(vis, s, float("-inf"))
        p = tl.exp2(s * s_scale - lse2[:, None])
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            th = _tanh(qk * (scale2 / softcap2))
            ds = ds * (1.0 - th * th)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
        kt_ptrs += BLOCK_N * skt
        vt_ptrs += BLOCK_N * svt
    return dq


@triton.jit(do_not_specialize=_LENGTHS)
def _dq_kernel(Q, K, V, dO, LSE, Delta, dQ,
               sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
               sdob, sdoh, sdot, sdod, sdqb, sdqh, sdqt, sdqd,
               Hq, group, Tq, Tk, scale,
               # MASK_PARAMS, in its order (checked at import):
               scale2, s_scale, PLAIN: tl.constexpr, softcap2, HAS_SOFTCAP: tl.constexpr,
               prefix, window, CAUSAL: tl.constexpr, Lengths, HAS_LENGTHS: tl.constexpr,
               DocIds, DocFirst, DocLast, sdb, HAS_DOCS: tl.constexpr,
               Slopes, ALIBI: tl.constexpr, Bias, sbb, sbh, sbq, sbk, HAS_BIAS: tl.constexpr,
               size_class,  # only a key for autotuning
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    rows, q_ok, start, mid_lo, mid_hi, end = _query_tile(
        Hq, Tq, Tk, prefix, window, Lengths, DocFirst, DocLast, sdb, CAUSAL, HAS_LENGTHS,
        HAS_DOCS, BLOCK_M, BLOCK_N)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    q_pos = Tk - Tq + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tile_ok = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :] * sqd,
                mask=tile_ok, other=0.0)
    do = tl.load(dO + b * sdob + h * sdoh + rows[:, None] * sdot + offs_d[None, :] * sdod,
                 mask=tile_ok, other=0.0)
    lse2 = _load_lse2(LSE + bh * Tq, rows, q_ok)
    delta = tl.load(Delta + bh * Tq + rows, mask=q_ok, other=0.0)
    Kh = K + b * skb + (h // group) * skh
    Vh = V + b * svb + (h // group) * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for seg in tl.static_range(3):
        seg_lo, seg_hi = _segment(seg, start, mid_lo, mid_hi, end)
        dq = _dq_tiles(
            dq, q, do, lse2, delta, Kh, Vh, skt, skd, svt, svd, seg_lo, seg_hi,
            q_pos[:, None], rows[:, None], q_ok[:, None], b, h, Tk,
            scale2, s_scale, PLAIN, softcap2, HAS_SOFTCAP, prefix, window, CAUSAL,
            Lengths, HAS_LENGTHS, DocIds, DocFirst, DocLast, sdb, HAS_DOCS,
            Slopes, ALIBI, Bias, sbb, sbh, sbq, sbk, HAS_BIAS,
            HEAD_DIM, BLOCK_D, BLOCK_N, seg != 1)
    tl.store(dQ + b * sdqb + h * sdqh + rows[:, None] * sdqt + offs_d[None, :] * sdqd,
             (dq * scale).to(dQ.dtype.element_ty), mask=tile_ok)


# -- launching ---------------------------------------------------------------------------------


def _check_mask_params(*fns) -> None:
    """Each of ``fns`` takes :data:`MASK_PARAMS` as one run of parameters, constexpr exactly
    where upper case: a field added to OP_FIELDS, or a kernel not updated, fails the import."""
    for fn in fns:
        names = fn.arg_names
        first = names.index(MASK_PARAMS[0]) if MASK_PARAMS[0] in names else 0
        run = tuple(names[first:first + len(MASK_PARAMS)])
        hints = fn.fn.__annotations__
        constexprs = [n for n in run if "constexpr" in str(hints.get(n, ""))]
        if run != MASK_PARAMS or constexprs != [n for n in run if n.isupper()]:
            raise RuntimeError(
                f"{fn.fn.__name__} takes the parameters {run} (constexpr: {constexprs}) where"
                f" MASK_PARAMS {MASK_PARAMS} belong (constexpr where upper case)"
            )


_check_mask_params(_fwd_tiles, _fwd_kernel, _decode_kernel, _dkdv_tiles, _dkdv_kernel,
                   _dq_tiles, _dq_kernel)


# Tile sizes, a short list per kernel, autotuned once per head dim, mask kind and size class.
# Picked with the sm_90 compiler's register report and timings on an H100 (BENCHMARKS.md); the
# first is the fixed choice when autotuning is off. Heads wider than 128 get one smaller tile.
def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                         num_stages=stages)


_KERNELS = {  # name: (kernel, configs for D <= 128, config for wider heads)
    "fwd": (_fwd_kernel,
            [_config(128, 64, 8, 3), _config(128, 128, 8, 3), _config(128, 64, 4, 4),
             _config(128, 128, 8, 4), _config(64, 64, 4, 3)],
            _config(64, 32, 8, 2)),
    # dK/dV: BLOCK_N keys per program, BLOCK_M queries per step
    "dkdv": (_dkdv_kernel,
             [_config(32, 128, 8, 3), _config(16, 128, 8, 3), _config(64, 128, 8, 3),
              _config(64, 64, 8, 3), _config(32, 64, 8, 3), _config(32, 64, 4, 2)],
             _config(16, 64, 8, 2)),
    "dq": (_dq_kernel,
           [_config(128, 64, 8, 3), _config(128, 128, 8, 3), _config(64, 64, 4, 3),
            _config(64, 128, 4, 3), _config(64, 32, 4, 2)],
           _config(64, 32, 8, 2)),
}
# In the interpreter tiles are small, so that short test sequences still span several tiles,
# and not square, so that query and key tiles cross boundaries at different places.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16})
# size_class (the sequence length rounded up to a power of two) is an argument only for this
# key: the best tile differs between short and long sequences, not between 3000 and 3100.
# The mask's constexpr flags are in the key too: each is a kernel variant of its own.
_TUNING_KEY = ["HEAD_DIM", *(p for p in MASK_PARAMS if p.isupper()), "size_class"]

# Set to False to launch the first config of each list (tests do, to compile less).
AUTOTUNE = not interpreting()


def _choices(name: str, block_d: int) -> list[triton.Config]:
    _, configs, wide = _KERNELS[name]
    if interpreting():
        return [_INTERPRETER_CONFIG]
    return configs if block_d <= 128 else [wide]


@cache
def _autotuned(name: str):
    def prune(configs, named_args, **kwargs):
        return _choices(name, {**named_args, **kwargs}["BLOCK_D"])

    kernel, configs, _ = _KERNELS[name]
    return triton.autotune(configs, key=_TUNING_KEY,
                           prune_configs_by={"early_config_prune": prune})(kernel)


def _launch(name: str, grid, *args, tq: int, tk: int, **kwargs) -> None:
    kwargs["size_class"] = triton.next_power_of_2(max(tq, tk))
    if AUTOTUNE and not interpreting():
        _autotuned(name)[grid](*args, **kwargs)
        return
    kernel = _KERNELS[name][0]
    config = _choices(name, kwargs["BLOCK_D"])[0]
    kernel[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                 num_stages=config.num_stages)


def _mask_args(call: AttentionCall) -> dict:
    """The kernels' mask arguments for ``call``: :data:`MASK_PARAMS` by name, in order."""
    rule, b, hq, tq, tk = call.rule, call.batch, call.q_heads, call.q_len, call.k_len
    device = call.device
    lengths = doc_ids = doc_first = doc_last = slopes = bias = None
    if rule.lengths is not None:
        lengths = rule.lengths.expand(b).to(torch.int32).contiguous()
    documents = rule.documents
    if rule.chunk is not None:
        # ChunkedCausal(n) is "same chunk" (k // n == q // n): a document per chunk, so the
        # kernels' document rule (same id) and its tile ranges (first/last position) serve it.
        chunks = (torch.arange(tk, device=device) // rule.chunk)[None]
        documents = chunks if documents is None else _pair_ids(documents, chunks)
    if documents is not None:
        doc_ids, doc_first, doc_last = _document_bounds(documents)
    if isinstance(call.bias, Alibi):
        slopes = call.bias.slopes.contiguous()
    elif call.bias is not None:
        bias = call.bias
    if rule.dense is not None:
        # A user's dense mask becomes -inf in the additive bias: one tensor read per tile.
        zero = torch.zeros((), dtype=call.dtype, device=device)
        bias = torch.where(rule.dense, zero if bias is None else bias, float("-inf"))
    sbb = sbh = sbq = sbk = 0
    if bias is not None:
        bias = bias.expand(b, hq, tq, tk)
        sbb, sbh, sbq, sbk = bias.stride()
    plain = call.softcap is None and slopes is None and bias is None
    scale2 = call.scale * LOG2E
    return dict(
        scale2=scale2, s_scale=scale2 if plain else 1.0, PLAIN=plain,
        softcap2=(call.softcap or 1.0) * LOG2E, HAS_SOFTCAP=call.softcap is not None,
        # PrefixLM(n) is "k <= q or k < n"; a causal mask is the same with n = 0.
        prefix=0 if rule.causal or rule.prefix is None else rule.prefix,
        window=rule.window if rule.window is not None else tk + 1,
        CAUSAL=rule.causal or rule.prefix is not None,
        Lengths=lengths, HAS_LENGTHS=lengths is not None,
        DocIds=doc_ids, DocFirst=doc_first, DocLast=doc_last,
        sdb=0 if doc_ids is None or doc_ids.shape[0] == 1 else tk, HAS_DOCS=doc_ids is not None,
        Slopes=slopes, ALIBI=slopes is not None,
        Bias=bias, sbb=sbb, sbh=sbh, sbq=sbq, sbk=sbk, HAS_BIAS=bias is not None,
    )


def _head(d: int) -> dict:
    """HEAD_DIM, and BLOCK_D: the tile width that holds it (a power of two, 16 at least)."""
    return {"HEAD_DIM": d, "BLOCK_D": max(16, triton.next_power_of_2(d))}


def _document_bounds(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per key position: a document id, and the first and last position of its document.

    Every key a query may see lies between those two positions of the query's document, so a
    tile range follows from them even when ids are not sorted. Shapes (Bd, Tk), int32.
    """
    bd, tk = ids.shape
    rows = torch.arange(bd, device=ids.device)[:, None].expand(bd, tk)
    doc = _pair_ids(rows, ids)  # equal only within one batch row
    pos = torch.arange(tk, device=ids.device).expand(bd, tk).flatten()
    first = torch.full((bd * tk,), tk, device=ids.device, dtype=torch.int64)
    last = torch.full((bd * tk,), -1, device=ids.device, dtype=torch.int64)
    first = first.scatter_reduce(0, doc.flatten(), pos, "amin")[doc]
    last = last.scatter_reduce(0, doc.flatten(), pos, "amax")[doc]
    return (doc.to(torch.int32).contiguous(), first.to(torch.int32).contiguous(),
            last.to(torch.int32).contiguous())


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _use_decode(q: Tensor, k: Tensor) -> bool:
    """A few queries against a longer cache: one query tile per head would leave the GPU idle."""
    return q.shape[2] <= DECODE_MAX_QUERIES and k.shape[2] > q.shape[2]


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: dict) -> tuple[Tensor, Tensor]:
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    o = empty_like_heads(q)
    lse = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    if _use_decode(q, k):
        _decode(q, k, v, o, lse, mask)
        return o, lse
    _launch("fwd", lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * hq),
            q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            hq, hq // hkv, tq, tk, **_head(d), **mask, tq=tq, tk=tk)
    return o, lse


def _decode(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: dict) -> None:
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    block_r = max(16, min(_DECODE_MAX_ROWS, triton.next_power_of_2(group * tq)))
    row_blocks = triton.cdiv(group * tq, block_r)
    if interpreting():
        block_n, chunk = 16, 32  # several splits even for short test caches
    else:
        block_n = 64
        # Enough programs for two waves over the GPU, and at least 256 keys per program.
        programs = b * hkv * row_blocks
        splits = max(1, min(triton.cdiv(2 * _sm_count(q.device.index or 0), programs),
                            triton.cdiv(tk, 256)))
        chunk = triton.cdiv(triton.cdiv(tk, splits), block_n) * block_n
    splits = triton.cdiv(tk, chunk)
    head = _head(d)
    rows = (splits, b * hq * tq)
    opart = torch.empty((*rows, head["BLOCK_D"]), dtype=torch.float32, device=q.device)
    lsepart = torch.empty(rows, dtype=torch.float32, device=q.device)
    _decode_kernel[(splits, b * hkv, row_blocks)](
        q, k, v, opart, lsepart, *q.stride(), *k.stride(), *v.stride(), hkv, group, tq, tk,
        chunk, **head, BLOCK_R=block_r, BLOCK_N=block_n, **mask, num_warps=4, num_stages=3)
    _merge_kernel[(b * hq * tq,)](
        opart, lsepart, o, lse, splits, hq, tq, *o.stride(), **head,
        BLOCK_S=triton.next_power_of_2(splits))


def _backward(do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
              lse: Tensor, scale: float, mask: dict) -> tuple[Tensor, Tensor, Tensor]:
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    head = _head(d)
    # The kernels read the LSE and its gradient as contiguous (B, Hq, Tq): a caller's row slice
    # (the ring's pieces) or sum()'s stride-0 gradient is copied first.
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(tq, 64), b * hq)](
        o, do, dlse, delta, *o.stride(), *do.stride(), hq, tq, HAS_DLSE=dlse is not None,
        **head, BLOCK_M=64)
    dq, dk, dv = empty_like_heads(q), empty_like_heads(k), empty_like_heads(v)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    _launch("dkdv", lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]), b * hkv),
            q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(),
            hq, hkv, hq // hkv, tq, tk, scale, **head, **mask, tq=tq, tk=tk)
    _launch("dq", lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * hq),
            q, k, v, do, lse, delta, dq, *strides, *dq.stride(),
            hq, hq // hkv, tq, tk, scale, **head, **mask, tq=tq, tk=tk)
    return dq, dk, dv


def forward(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, Tq, D) and LSE (B, Hq, Tq) for a validated call (``triton_fwd``)."""
    return _forward(q, k, v, _mask_args(call))


def backward(do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
             lse: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), the probabilities recomputed from the LSE (``triton_bwd``)."""
    return _backward(do, dlse, q, k, v, o, lse, call.scale, _mask_args(call))
