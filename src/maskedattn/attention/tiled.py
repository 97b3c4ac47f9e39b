"""The CPU flash-attention backend: tiles, an online softmax, and a backward from the LSE.

FlashAttention's idea, on the CPU. Queries are cut into tiles of ``block_q`` rows and keys into
tiles of ``block_k`` columns. Each query tile walks over the key tiles keeping, per row, the
running maximum ``m`` of the scores and the running sum ``l`` of ``exp(s - m)``; its output
accumulates ``exp(s - m) @ v`` and is re-weighted whenever ``m`` grows. The Tq x Tk score matrix
never exists: memory is O(T). The forward keeps only the output and each row's log-sum-exp,
``lse = m + log(l)``; the backward recomputes each tile's probabilities as ``exp(s - lse)``.

The mask is classified per tile (:meth:`MaskRule.classify`): empty tiles are skipped (causal
attention does half the work, a sliding window makes it linear in T, documents skip each
other), full tiles apply no mask, and only partial tiles build one.

Two implementations of the same algorithm:

- the native kernel (``csrc/tiled_attention.c``, built and loaded by :mod:`.native`): fused
  tiles in L1/L2, AVX-512 with bfloat16 dot products where the CPU has them, OpenMP threads;
- the pure-torch twin below (:func:`forward_torch`, :func:`backward_torch`): readable, the
  fallback where the kernel cannot be built, and the kernel's test oracle.

Both compute in float32 (bfloat16 inputs keep bfloat16 products in the kernel, with float32
accumulation and statistics) and return outputs in the inputs' dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import native, ops, sdpa
from .backend import AttentionCall
from .lowering import OP_FIELDS, empty_like_heads, op_args
from .masks import Alibi, TileKind, bias_block

__all__ = ["backward_torch", "forward_torch", "run", "why_not"]

# Tile sizes, in rows of queries and columns of keys; multiples of 16 (the kernel's vectors).
# `maskedattn bench attention --tune` on the machine of BENCHMARKS.md (1 MiB L2 per core):
# 128 x 128 beats 64 x 64 by 5-10% forward and 15-30% backward at T = 4096; 256 gains a few
# percent more but doubles each thread's working set.
FORWARD_BLOCKS = (128, 128)
BACKWARD_BLOCKS = (128, 128)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -- the backend contract ----------------------------------------------------------------------


def why_not(call: AttentionCall) -> str | None:
    """Serves CPU calls in float32, bfloat16 and float16, every mask and bias.

    Where the native kernel cannot be built, the pure-torch path is slower than SDPA: calls
    that SDPA can serve are declined then (``backend="auto"`` takes SDPA), unless
    ``MASKEDATTN_NATIVE=0`` asks for the pure-torch path.
    """
    if call.device.type != "cpu":
        return f"it runs on the CPU only, got a tensor on {call.device}"
    if call.dtype not in _DTYPES:
        return f"it computes float32, bfloat16 and float16, got {call.dtype}"
    if isinstance(call.bias, Tensor) and call.bias.requires_grad:
        return "it does not compute gradients for a bias tensor"
    # (A preference only, and the build is not traced: compiled graphs leave it to the operator,
    # which runs the pure-torch twin where the kernel is missing.)
    if not torch.compiler.is_compiling() and _native_unbuildable() and sdpa.why_not(call) is None:
        return ("its native kernel cannot be built here, and its pure-torch path is slower"
                " than sdpa for this call; set MASKEDATTN_NATIVE=0 to use that path anyway")
    return None


def run(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor | None]:
    """Backend entry point: the ``maskedattn::tiled_fwd`` operator (autograd through
    ``maskedattn::tiled_bwd``); the LSE only when asked."""
    out, lse = ops.flash_forward("tiled", q, k, v, op_args(call), call)
    return out, (lse if call.return_lse else None)


def _native_unbuildable() -> bool:
    return native.kernel() is None and native.requested_variant() is not None


# -- the pure-torch twin -----------------------------------------------------------------------


def _grouped(t: Tensor, kv_heads: int) -> Tensor:
    """(X, H, ...) with H in {1, Hq} as (X, Hkv, G, ...) or (X, 1, 1, ...), no copy.

    Grouped-query attention without copying k and v: query head h = hk * G + g reads kv head
    hk, so q is viewed as (B, Hkv, G, T, D) and k, v as (B, Hkv, 1, T, D), which broadcast.
    """
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.unflatten(1, (kv_heads, t.shape[1] // kv_heads))


def _tile_scores(q: Tensor, k: Tensor, call: AttentionCall, q_idx: Tensor, k_idx: Tensor,
                 kind: Tensor) -> tuple[Tensor, Tensor | None]:
    """Scores of one tile in the grouped layout (B, Hkv, G, bq, bk), float32, and the
    softcap's tanh (None without softcap). Masked only if some of it is partial or empty."""
    s = (q @ k.transpose(-1, -2)) * call.scale
    th = None
    if call.softcap is not None:
        th = torch.tanh(s / call.softcap)
        s = call.softcap * th
    if call.bias is not None:
        s = s + _grouped(bias_block(call.bias, q_idx, k_idx, call.offset).float(), k.shape[1])
    if not bool((kind == TileKind.FULL).all()):
        visible = _grouped(call.rule.block(q_idx, k_idx, call.offset), k.shape[1])
        s = s.masked_fill(~visible, -math.inf)
    return s, th


def _tiles(n: int, block: int) -> list[tuple[int, int, int]]:
    return [(i, start, min(start + block, n)) for i, start in enumerate(range(0, n, block))]


def forward_torch(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall,
                  blocks: tuple[int, int] = FORWARD_BLOCKS) -> tuple[Tensor, Tensor]:
    """Tiled forward in torch operations: (output in q's dtype, lse float32 (B, Hq, Tq))."""
    block_q, block_k = blocks
    hkv = call.kv_heads
    kinds = _grouped(call.rule.classify(call.q_len, call.k_len, block_q, block_k), hkv)
    qg = _grouped(q.float(), hkv)
    kg, vg = k.float().unsqueeze(2), v.float().unsqueeze(2)
    out = torch.empty_like(qg)
    lse = torch.empty(qg.shape[:-1])
    for qi, q0, q1 in _tiles(call.q_len, block_q):
        q_idx = torch.arange(q0, q1)
        rows = (*qg.shape[:3], q1 - q0)
        m = torch.full(rows, -math.inf)  # running row max
        l = torch.zeros(rows)  # running sum of exp(s - m)
        acc = torch.zeros(*rows, qg.shape[-1])  # running sum of exp(s - m) v
        for kj, k0, k1 in _tiles(call.k_len, block_k):
            kind = kinds[..., qi, kj]
            if bool((kind == TileKind.EMPTY).all()):
                continue
            s, _ = _tile_scores(qg[..., q0:q1, :], kg[..., k0:k1, :], call, q_idx,
                                torch.arange(k0, k1), kind)
            m_new = torch.maximum(m, s.amax(-1))
            # Rows with nothing visible so far keep m = -inf; exponents against 0 give them
            # weights 0 instead of exp(-inf + inf) = NaN.
            m_use = torch.where(m_new == -math.inf, 0.0, m_new)
            p = torch.exp(s - m_use[..., None])
            alpha = torch.exp(m - m_use)  # re-weights what was summed against the old max
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vg[..., k0:k1, :]
            m = m_new
        seen = l != 0
        out[..., q0:q1, :] = acc / torch.where(seen, l, 1.0)[..., None]
        lse[..., q0:q1] = torch.where(seen, m + torch.log(l), -math.inf)
    return empty_like_heads(q).copy_(out.flatten(1, 2)), lse.flatten(1, 2)


def backward_torch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
                   d_lse: Tensor | None, call: AttentionCall,
                   blocks: tuple[int, int] = BACKWARD_BLOCKS) -> tuple[Tensor, Tensor, Tensor]:
    """Tiled backward in torch operations: (dq, dk, dv) in the inputs' dtypes.

    ``d_lse`` is the gradient reaching the LSE, if any. Key tiles are the outer loop, so each
    tile's dk and dv are finished before the next; dq accumulates.
    """
    # dS = P (dP - delta) with delta = rowsum(dO * O); d lse_i / d s_ij = p_ij, so a gradient
    # reaching the LSE joins as a shift of delta.
    delta = (d_out.float() * out.float()).sum(-1)
    if d_lse is not None:
        delta = delta - d_lse.float()
    block_q, block_k = blocks
    hkv = call.kv_heads
    kinds = _grouped(call.rule.classify(call.q_len, call.k_len, block_q, block_k), hkv)
    qg, dog = _grouped(q.float(), hkv), _grouped(d_out.float(), hkv)
    kg, vg = k.float().unsqueeze(2), v.float().unsqueeze(2)
    # A row that saw no key has lse -inf and probabilities 0: exp(s - inf) gives them.
    lse_g = _grouped(torch.where(lse == -math.inf, math.inf, lse), hkv)
    delta_g = _grouped(delta, hkv)
    dq = torch.zeros_like(qg)
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for kj, k0, k1 in _tiles(call.k_len, block_k):
        k_idx = torch.arange(k0, k1)
        for qi, q0, q1 in _tiles(call.q_len, block_q):
            kind = kinds[..., qi, kj]
            if bool((kind == TileKind.EMPTY).all()):
                continue
            q_t, do_t = qg[..., q0:q1, :], dog[..., q0:q1, :]
            s, th = _tile_scores(q_t, kg[..., k0:k1, :], call, torch.arange(q0, q1), k_idx, kind)
            p = torch.exp(s - lse_g[..., q0:q1, None])
            dp = do_t @ vg[..., k0:k1, :].transpose(-1, -2)
            ds = p * (dp - delta_g[..., q0:q1, None])
            if th is not None:  # d(c tanh(x / c)) / dx = 1 - tanh^2
                ds = ds * (1 - th * th)
            ds = ds * call.scale
            dv[:, :, k0:k1] += (p.transpose(-1, -2) @ do_t).sum(2)
            dk[:, :, k0:k1] += (ds.transpose(-1, -2) @ q_t).sum(2)
            dq[..., q0:q1, :] += ds @ kg[..., k0:k1, :]
    return tuple(empty_like_heads(t).copy_(g) for t, g in ((q, dq.flatten(1, 2)), (k, dk), (v, dv)))


# -- the native kernel: its arguments ---------------------------------------------------------

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SCALAR_FIELDS = tuple(name for name, kind in OP_FIELDS if kind != "Tensor?")


def _blocks_for(call: AttentionCall, blocks: tuple[int, int], backward: bool) -> tuple[int, int]:
    """Tiles no larger than the call. Key tiles, and the backward's query tiles, are rows of
    vectors: multiples of 16. The forward's query tiles are any height (1 when decoding)."""
    def fit(block: int, n: int) -> int:
        return min(block, -(-n // 16) * 16)

    block_q = fit(blocks[0], call.q_len) if backward else min(blocks[0], call.q_len)
    return block_q, fit(blocks[1], call.k_len)


def _stride(t: Tensor, dim: int) -> int:
    """Stride of ``dim`` in elements, 0 where the size is 1 (so the kernel may broadcast)."""
    return t.stride(dim) if t.shape[dim] > 1 else 0


def _view(t: Tensor) -> native.View:
    # Written out, not through _stride: decoding builds four views per layer and token.
    (b, h, n, _), (sb, sh, sn, _) = t.shape, t.stride()
    return native.View(t.data_ptr(), sb if b > 1 else 0, sh if h > 1 else 0, sn if n > 1 else 0)


def _rows_contiguous(t: Tensor) -> Tensor:
    """The kernel reads rows of d contiguous elements; other strides are free."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _compact_float(t: Tensor) -> Tensor:
    """``t`` as float32 without materialising its broadcast (stride 0) dimensions."""
    index = tuple(slice(0, 1) if s == 0 else slice(None) for s in t.stride())
    return t[index].float().contiguous().expand(t.shape)


def _args(call: AttentionCall, blocks: tuple[int, int], keep: list[Tensor]) -> native.AttnArgs:
    """The sizes, tile kinds, mask and bias of ``call`` as kernel arguments. Tensors whose
    pointers the arguments hold are appended to ``keep``, which the caller keeps alive."""
    block_q, block_k = blocks
    rule = call.rule
    # The scalar fields of the lowering (causal, window, prefix, chunk, softcap, scale) by name;
    # the tensors below, each as the kernel reads it.
    args = op_args(call)
    scalars = {name: getattr(args, name) for name in _SCALAR_FIELDS}
    a = native.AttnArgs(
        batch=call.batch, q_heads=call.q_heads, kv_heads=call.kv_heads, q_len=call.q_len,
        k_len=call.k_len, head_dim=call.head_dim, dtype=_DTYPE_CODES[call.dtype],
        block_q=block_q, block_k=block_k, n_threads=torch.get_num_threads(), **scalars,
    )
    # The kernel classifies the positional parts of the rule itself; documents and dense masks
    # are classified here.
    if rule.documents is not None or rule.dense is not None:
        kinds = rule.classify(call.q_len, call.k_len, block_q, block_k).contiguous()
        a.kinds, a.kinds_sb, a.kinds_sh = kinds.data_ptr(), _stride(kinds, 0), _stride(kinds, 1)
        keep.append(kinds)
    if rule.lengths is not None:
        lengths = rule.lengths.contiguous()
        a.lengths, a.lengths_sb = lengths.data_ptr(), _stride(lengths, 0)
        keep.append(lengths)
    if rule.documents is not None:
        docs = rule.documents.contiguous()
        a.documents, a.documents_sb = docs.data_ptr(), _stride(docs, 0)
        keep.append(docs)
    if rule.dense is not None:  # bool: one byte per element, read in place
        a.dense = rule.dense.data_ptr()
        a.dense_sb, a.dense_sh, a.dense_sq, a.dense_sk = (_stride(rule.dense, i) for i in range(4))
    if isinstance(call.bias, Alibi):
        slopes = call.bias.slopes.float().contiguous()
        a.alibi = slopes.data_ptr()
        keep.append(slopes)
    elif call.bias is not None:
        bias = _compact_float(call.bias)
        a.bias = bias.data_ptr()
        a.bias_sb, a.bias_sh, a.bias_sq, a.bias_sk = (_stride(bias, i) for i in range(4))
        keep.append(bias)
    return a


def forward_native(kernel: native.Kernel, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall,
                   blocks: tuple[int, int] = FORWARD_BLOCKS, *, lse: bool = True
                   ) -> tuple[Tensor, Tensor | None]:
    """The forward of the native kernel: (output in q's dtype, lse float32 (B, Hq, Tq), or
    None without ``lse``: inference that does not ask for it skips writing it)."""
    keep: list[Tensor] = []
    a = _args(call, _blocks_for(call, blocks, backward=False), keep)
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    out = empty_like_heads(q)
    a.q, a.k, a.v, a.out = _view(q), _view(k), _view(v), _view(out)
    lse_out = None
    if lse:
        lse_out = torch.empty(q.shape[:-1])
        a.lse = lse_out.data_ptr()
    kernel.forward(a)
    return out, lse_out


def backward_native(kernel: native.Kernel, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                    lse: Tensor, d_out: Tensor, d_lse: Tensor | None, call: AttentionCall,
                    blocks: tuple[int, int] = BACKWARD_BLOCKS) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of the native kernel: (dq, dk, dv) in the inputs' dtypes."""
    keep: list[Tensor] = []
    a = _args(call, _blocks_for(call, blocks, backward=True), keep)
    q, k, v, out = (_rows_contiguous(t) for t in (q, k, v, out))
    d_out = _rows_contiguous(d_out.to(q.dtype))
    grads = [empty_like_heads(t) for t in (q, k, v)]
    a.q, a.k, a.v, a.out, a.d_out = (_view(t) for t in (q, k, v, out, d_out))
    a.dq, a.dk, a.dv = (_view(t) for t in grads)
    lse = lse.contiguous()
    a.lse = lse.data_ptr()
    if d_lse is not None:
        d_lse = d_lse.float().contiguous()
        a.d_lse = d_lse.data_ptr()
    kernel.backward(a)
    return tuple(grads)
