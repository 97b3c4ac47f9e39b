"""Ring attention in real gloo processes against one process's attention() on the whole sequence.

Every rank draws the same whole q, k, v and output gradient, takes its shard, runs the ring
forward and backward, and gathers the results; rank 0's error against the float64 reference must
be within twice that of the naive float32 reference (the tolerance of every backend test).
"""

from __future__ import annotations

import glob
import importlib.util
import sys

import pytest
import torch
import torch.distributed as dist

import maskedattn as ma
from maskedattn.attention import ring
from maskedattn.attention.masks import (
    Alibi,
    Causal,
    ChunkedCausal,
    Documents,
    Padding,
    PrefixLM,
    SlidingWindow,
)
from tests.distributed import run_ranks
from tests.helpers import ERROR_FLOOR, relative_error


def _masks(t: int, b: int) -> dict[str, object]:
    ids = torch.tensor([[0] * (t // 3) + [1] * (t // 4) + [2] * (t - t // 3 - t // 4),
                        [0] * (t // 2) + [1] * (t - t // 2)])[:b]
    return {
        "none": None,
        "causal": Causal(),
        "window": SlidingWindow(max(2, t // 5)),
        "prefix": PrefixLM(t // 3),
        "padding": Padding([t - 5, t // 2][:b]),
        "causal-padding": Causal() & Padding([t - 5, t // 2][:b]),
        "documents": Causal() & Documents(ids),
        "documents-bidirectional": Documents(ids),
        "chunked": ChunkedCausal(max(2, t // 5)),  # chunks that straddle the ranks' chunks
        "chunked-documents": ChunkedCausal(max(2, t // 4)) & Documents(ids),
    }


def _case(rank, world, t, mask_name, layout, hq=2, hkv=2, alibi=False, softcap=None,
          backend="auto"):
    b, d = 2, 8
    g = torch.Generator().manual_seed(t * 7 + hq)
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
               for h in (hq, hkv, hkv))
    do = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64)
    mask = _masks(t, b)[mask_name]
    kwargs = {"softcap": softcap}
    if alibi:
        kwargs["bias"] = Alibi(Alibi.default_slopes(hq))

    def single(dtype, backend):
        x = [a.to(dtype).detach().requires_grad_() for a in (q, k, v)]
        out = ma.attention(*x, mask, backend=backend, **kwargs)
        out.backward(do.to(dtype))
        return [out.detach(), *(a.grad for a in x)]

    exact, naive = single(torch.float64, "reference"), single(torch.float32, "reference")
    local = [ring.shard(a.float(), 2, layout=layout).detach().requires_grad_() for a in (q, k, v)]
    out = ring.ring_attention(*local, mask, layout=layout, seq_len=t, backend=backend, **kwargs)
    out.backward(ring.shard(do.float(), 2, layout=layout))
    ours = [ring.gather(x, 2, layout=layout, seq_len=t)
            for x in (out.detach(), *(a.grad for a in local))]
    for name, e, n, o in zip(("out", "dq", "dk", "dv"), exact, naive, ours, strict=True):
        err, naive_err = relative_error(o, e), relative_error(n, e)
        tol = 2 * naive_err + ERROR_FLOOR[torch.float32]
        assert err <= tol, (f"{mask_name} {layout} T={t} world={world}: {name} relative error"
                            f" {err:.3g} > {tol:.3g}")


def _all_masks(rank, world, lengths, layouts, names=None):
    for t in lengths:
        for layout in layouts:
            for name in names or _masks(t, 2):
                _case(rank, world, t, name, layout)


def _two_ranks(rank, world):
    _all_masks(rank, world, (113,), ("zigzag",))  # 113: padded to 116
    _all_masks(rank, world, (24,), ("contiguous",))


def _features(rank, world):
    t = 37  # not a multiple of 2 * world: padded
    _case(rank, world, t, "causal", "zigzag", hq=4, hkv=2)  # GQA
    _case(rank, world, t, "causal", "zigzag", alibi=True)
    _case(rank, world, t, "window", "contiguous", alibi=True, softcap=2.0)
    _case(rank, world, t, "documents", "zigzag", hq=4, hkv=1, softcap=5.0)
    x = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="dense masks are not positional"):
        ring.ring_attention(x, x, x, torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="Alibi is served only"):
        ring.ring_attention(x, x, x, None, bias=Alibi(torch.ones(2)))
    with pytest.raises(ValueError, match="multiple of 2"):
        ring.ring_attention(x[:, :, :7], x[:, :, :7], x[:, :, :7], Causal())
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        ring.ring_attention(x.double(), x.double(), x.double(), Causal())


def _skipping(rank, world):
    """Blocks nobody reads are neither computed nor sent."""
    x = torch.randn(1, 2, 16, 4)  # T = 64, contiguous chunks of 16
    stats = ring.RingStats()
    ring.ring_attention(x, x, x, SlidingWindow(8), layout="contiguous", stats=stats)
    assert stats.steps == [2]  # each block goes one hop: the next rank's window reaches it
    assert stats.bytes_sent == (0 if rank == world - 1 else 2 * x.numel() * 4)
    stats = ring.RingStats()
    ring.ring_attention(x, x, x, Causal(), layout="contiguous", stats=stats)
    assert stats.pairs_computed == rank + 1  # the diagonal and every block before it
    # Rank r passes on its own block and those before it; nothing wraps round to rank 0.
    assert stats.bytes_sent == (0 if rank == world - 1 else (rank + 1) * 2 * x.numel() * 4)
    stats = ring.RingStats()
    ring.ring_attention(x, x, x, Causal(), layout="zigzag", stats=stats)
    assert stats.pairs_computed == 3 + 2 * (world - 1)  # balanced: the same on every rank


def _triton(rank, world):
    # CPU tensors under Triton's interpreter (tests/attention/conftest.py sets TRITON_INTERPRET,
    # which the spawned ranks inherit): the triton forward and backward operators in the ring.
    for name in ("causal", "documents", "chunked"):
        _case(rank, world, 21, name, "zigzag", hq=4, hkv=2, backend="triton")


def _gloo_threads() -> int:
    return sum(open(f).read().strip() == "pt_gloo_runloop"
               for f in glob.glob("/proc/self/task/*/comm"))


def _group_released(rank, world):
    """After destroy_process_group no thread of the group is left to abort the process at exit.

    torch keeps the group alive past destroy_process_group when torch._dynamo is first
    imported after the group exists, as any custom operator's first call does.
    """
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    ring.ring_attention(q, q, q, Causal()).sum().backward()
    dist.destroy_process_group()
    assert _gloo_threads() == 0


def _four_ranks(rank, world):
    _all_masks(rank, world, (35,), ("zigzag",),
               ("causal", "window", "prefix", "documents", "chunked"))
    _skipping(rank, world)


def test_every_mask_two_ranks_odd_length() -> None:
    run_ranks(_two_ranks, 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_destroying_the_group_ends_its_threads() -> None:
    run_ranks(_group_released, 2)


def test_features_two_ranks() -> None:
    run_ranks(_features, 2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_two_ranks() -> None:
    run_ranks(_triton, 2, timeout=300)


def test_masks_four_ranks() -> None:
    run_ranks(_four_ranks, 4)


@pytest.mark.slow
def test_wide_four_ranks() -> None:
    run_ranks(_all_masks, 4, (16, 57, 130), ("zigzag", "contiguous"), timeout=600)
    run_ranks(_features, 4, timeout=300)
