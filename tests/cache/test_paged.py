import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.cache.allocator import (PageAllocator, PoolExhausted, SequencePages,
                                        kv_bytes_per_sequence)
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.sparsity.policy import DENSE, STREAM
from pallas_kernels.layout import ring_slots
from pallas_kernels.paged_write.reference import write_tokens_reference
from tests.helpers import allocated_cache

CFG = ModelConfig(n_layers=2, n_kv_heads=2, head_dim=8)
SP = SparsityConfig(page_size=8, logical_page_size=4, decode_sink=8, decode_local=8,
                    token_budget=24)


def _bits(x):
    return np.asarray(x).view(np.uint32)


def _write(cache, layer, k, v, new_lens, streaming):
    return write_tokens_reference(
        cache.k, cache.v, cache.kmin, cache.kmax, cache.page_table[:, layer], cache.lengths,
        k, v, jnp.asarray(new_lens, jnp.int32), jnp.asarray(streaming), sink_pages=SP.sink_pages,
        ring_pages=SP.ring_pages)


def test_prefill_write_lands_exactly_and_touches_nothing_else():
    modes = np.full((2, 2), DENSE)
    cache, _ = allocated_cache(CFG, SP, [40, 24, 0], modes)
    key = jax.random.key(0)
    k, v = jax.random.normal(key, (2, 3, 30, 2, 8))
    lens = [30, 17, 0]
    kp, vp, kmin, kmax = _write(cache, 1, k, v, lens, [False, False])
    table = np.asarray(cache.page_table[:, 1])
    written = np.zeros(kp.shape[:2], bool)
    for b, n in enumerate(lens):
        for t in range(n):
            for h in range(2):
                page, slot = table[b, h, t // 8], t % 8
                np.testing.assert_array_equal(_bits(kp[page, slot]), _bits(k[b, t, h]))
                np.testing.assert_array_equal(_bits(vp[page, slot]), _bits(v[b, t, h]))
                written[page, slot] = True
    written[0] = True  # the trash page takes the padded tokens
    np.testing.assert_array_equal(_bits(kp)[~written], _bits(cache.k)[~written])
    np.testing.assert_array_equal(_bits(vp)[~written], _bits(cache.v)[~written])


def test_statistics_after_many_appends_equal_min_max_of_stored_keys():
    modes = np.full((2, 2), DENSE)
    cache, _ = allocated_cache(CFG, SP, [64, 64], modes)
    keys = jax.random.normal(jax.random.key(1), (2, 37, 2, 8))
    lens = np.array([0, 0])
    kp, vp, kmin, kmax = cache.k, cache.v, cache.kmin, cache.kmax
    # a 5-token prefill, then one token at a time (the second row idles every third step)
    state = (kp, vp, kmin, kmax)
    for start, stop in [(0, 5)] + [(i, i + 1) for i in range(5, 37)]:
        active = np.array([1, int(start % 3 != 0 or start < 5)]) * (stop - start)
        c = cache.__class__(*state, cache.page_table, jnp.asarray(lens, jnp.int32),
                            cache.selected)
        chunk = jnp.stack([keys[0, start:stop], keys[1, lens[1]:lens[1] + stop - start]])
        state = _write(c, 0, chunk, chunk, active, [False, False])
        lens = lens + active
    kp, _, kmin, kmax = state
    table = np.asarray(cache.page_table[:, 0])
    for b in range(2):
        for h in range(2):
            stored = keys[b, : lens[b], h]
            for j in range(-(-lens[b] // 4)):  # logical pages of 4 tokens
                page, row = table[b, h, j // 2], j % 2
                chunk = stored[4 * j: 4 * j + 4]
                np.testing.assert_array_equal(np.asarray(kmin[page, row]), chunk.min(0))
                np.testing.assert_array_equal(np.asarray(kmax[page, row]), chunk.max(0))


def test_streaming_head_keeps_sink_and_ring_only():
    modes = np.array([[STREAM, DENSE], [DENSE, DENSE]])
    cache, _ = allocated_cache(CFG, SP, [80], modes)
    n = 61
    k = jax.random.normal(jax.random.key(2), (1, n, 2, 8))
    kp, _, _, _ = _write(cache, 0, k, k, [n], [True, False])
    table = np.asarray(cache.page_table[0, 0, 0])
    assert len(set(table[:10].tolist())) == SP.stream_pages  # aliased: sink 1 + ring 2 pages
    last = (n - 1) // 8
    for t in range(n):
        j = t // 8
        if j < SP.sink_pages or j > last - SP.ring_pages:
            np.testing.assert_array_equal(np.asarray(kp[table[j], t % 8]), k[0, t, 0])


def test_allocator_refuses_and_releases():
    alloc = PageAllocator(10)
    got = alloc.allocate(9)
    with pytest.raises(PoolExhausted, match="num_pages"):
        alloc.allocate(1)
    alloc.release(got[:3])
    assert alloc.free == 3 and 0 not in got
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(1)


def test_reserve_aliases_streaming_heads_and_counts_memory():
    modes = np.array([[STREAM, DENSE], [DENSE, STREAM]])
    pages = SequencePages(PageAllocator(200), modes == STREAM, SP, max_pages=12)
    row, owned = pages.reserve(90)  # 12 pages
    assert list(owned) == [0] and len(owned[0]) == 2 * 12 + 2 * SP.stream_pages
    slots = ring_slots(12, True, SP.sink_pages, SP.ring_pages)
    np.testing.assert_array_equal(row[0, 0], np.asarray(row[0, 0])[slots])
    assert len(set(row[0, 1].tolist())) == 12
    dense_bytes = kv_bytes_per_sequence(90, np.zeros((2, 2), bool), CFG, SP)
    half = kv_bytes_per_sequence(90, modes == STREAM, CFG, SP)
    assert half == dense_bytes * (24 + 2 * SP.stream_pages) // 48
    with pytest.raises(ValueError, match="max_seq_len"):
        pages.reserve(200)


def test_sharded_pool_hands_each_device_its_own_heads_pages():
    """tp = 2, dp = 2: a (layer, KV head)'s pages are local ids of the shard of the device
    holding that head in the sequence's replica; a replica that cannot hold a sequence on one
    of its devices takes nothing anywhere."""
    modes = np.array([[STREAM, DENSE, DENSE, DENSE], [DENSE, DENSE, STREAM, STREAM]])
    alloc = PageAllocator(4 * 40, shards=4)
    pages = SequencePages(alloc, modes == STREAM, SP, max_pages=12, tp=2)
    need = pages.per_device(90)  # 12 pages a dense head, stream_pages a streaming one
    assert need.tolist() == [3 * 12 + SP.stream_pages, 2 * 12 + 2 * SP.stream_pages]
    row, owned = pages.reserve(90, replica=1)
    assert sorted(owned) == [2, 3] and [len(owned[s]) for s in (2, 3)] == need.tolist()
    for head in range(4):
        shard = 2 + head // 2
        used = set(row[:, head].ravel().tolist()) - {0}
        assert used <= set(owned[shard]) and max(used) < 40
    assert alloc.free_in(0) == alloc.free_in(1) == 39
    with pytest.raises(PoolExhausted, match="device 2"):
        pages.reserve(90, replica=1)
    assert [alloc.free_in(s) for s in (2, 3)] == [39 - need[0], 39 - need[1]]
    assert not pages.fits(90, replica=1) and pages.fits(90, replica=0)
    pages.release(owned)
    assert alloc.free == alloc.capacity == 4 * 39
    with pytest.raises(ValueError, match="uneven"):
        PageAllocator(81, shards=4)
