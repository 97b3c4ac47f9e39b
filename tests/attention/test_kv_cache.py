"""The static KV cache: per-row writes, GQA, decoding through attention() vs the reference."""

import pytest
import torch

import maskedattn as ma
from maskedattn.attention.kv_cache import KVCache
from tests.helpers import random_qkv


def test_rows_write_at_their_own_positions():
    cache = KVCache(2, 3, 10, 4)
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k_all, v_all = cache.update(torch.tensor([[0, 1], [5, 6]]), k, v)
    assert k_all.shape == (2, 3, 10, 4) and k_all is cache.k
    assert torch.equal(k_all[0, :, 0:2], k[0]) and torch.equal(v_all[1, :, 5:7], v[1])
    assert (k_all[0, :, 2:] == 0).all() and (k_all[1, :, :5] == 0).all()
    shared = torch.randn(2, 3, 1, 4)
    cache.update(torch.tensor([[9]]), shared, shared)  # (1, T) positions serve every row
    assert torch.equal(cache.k[:, :, 9], shared[:, :, 0])


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (6, 2), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prefill_then_decode_equals_attention_over_everything(hq, hkv, dtype):
    """Unequal rows: right-padded prefill, then one query per step with Causal & Padding."""
    g = torch.Generator().manual_seed(0)
    lengths = [7, 3]
    total = 12
    q, k, v = random_qkv(2, hq, hkv, total, total, 8, dtype=dtype, generator=g)
    cache = KVCache(2, hkv, 16, 8, dtype=dtype)
    cache.update(torch.arange(7)[None], k[:, :, :7], v[:, :, :7])  # row 1: 4 padding slots
    for _ in range(4):
        pos = torch.tensor(lengths)
        # row b's token number `pos[b]`, from its own sequence
        kn = torch.stack([k[b, :, p] for b, p in enumerate(lengths)])[:, :, None]
        vn = torch.stack([v[b, :, p] for b, p in enumerate(lengths)])[:, :, None]
        qn = torch.stack([q[b, :, p] for b, p in enumerate(lengths)])[:, :, None]
        k_all, v_all = cache.update(pos[:, None], kn, vn)
        n = max(lengths) + 1
        out = ma.attention(qn, k_all[:, :, :n], v_all[:, :, :n],
                           ma.Causal() & ma.Padding(pos + 1))
        for b, p in enumerate(lengths):
            want = ma.reference_attention(q[b : b + 1, :, p : p + 1], k[b : b + 1, :, : p + 1],
                                          v[b : b + 1, :, : p + 1])
            torch.testing.assert_close(out[b : b + 1], want)
        lengths = [p + 1 for p in lengths]


def test_bad_updates_are_clear_errors():
    cache = KVCache(2, 3, 10, 4)
    ok = torch.zeros(2, 3, 1, 4)
    with pytest.raises(ValueError, match=r"k must have shape \(B, Hkv, T, D\) = \(2, 3, T, 4\)"):
        cache.update(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 6, 1, 4), ok)
    with pytest.raises(TypeError, match=r"dtype torch\.float64"):
        cache.update(torch.zeros(2, 1, dtype=torch.long), ok.double(), ok.double())
    with pytest.raises(ValueError, match="positions must have shape"):
        cache.update(torch.zeros(2, dtype=torch.long), ok, ok)
    with pytest.raises(ValueError, match="max_len must be an integer >= 1"):
        KVCache(1, 1, 0, 4)


@pytest.mark.parametrize("positions", [[[-1]], [[10]], [[3], [-2]], [[0], [10]], [[4, 11]]])
def test_positions_outside_the_cache_are_refused(positions):
    # Before: advanced indexing wrote a negative position at the end of the cache, silently.
    positions = torch.tensor(positions)
    cache = KVCache(2, 3, 10, 4)
    new = torch.ones(2, 3, positions.shape[1], 4)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 10\)"):
        cache.update(positions, new, new)


@pytest.mark.parametrize("rows", [1, 2])
def test_writes_match_advanced_indexing(rows):
    # The writes (index_copy_ for one row of positions, a scatter otherwise) against the
    # indexing they replaced, on strided inputs as a model's projection gives them.
    g = torch.Generator().manual_seed(3)
    positions = torch.tensor([[2, 7, 5]]) if rows == 1 else torch.tensor([[2, 7, 5], [0, 1, 9]])
    proj = torch.randn(2, 3, 3, 3 * 4, generator=g)  # (B, T, Hkv, 3 D): views of a projection
    k, v = proj[..., 4:8].transpose(1, 2), proj[..., 8:].transpose(1, 2)  # (B, Hkv, T, D)
    cache = KVCache(2, 3, 10, 4)
    k_all, v_all = cache.update(positions, k, v)
    want_k, want_v = torch.zeros(2, 3, 10, 4), torch.zeros(2, 3, 10, 4)
    batch = torch.arange(2)[:, None]
    want_k[batch, :, positions] = k.transpose(1, 2)
    want_v[batch, :, positions] = v.transpose(1, 2)
    assert torch.equal(k_all, want_k) and torch.equal(v_all, want_v)
