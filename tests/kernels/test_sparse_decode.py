"""Unified sparse paged decode kernel (interpret mode) against its plain-jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.sparse_decode.api import sparse_decode
from pallas_kernels.sparse_decode.kernel import DecodeBlocks
from pallas_kernels.sparse_decode.reference import sparse_decode_reference
from tests.kernels.conftest import INTERPRET, close, nan_pool, random_tables

SINK, LOCAL = 20, 40


def _case(g, page_size, gs, dtype, seed, b=3, k=2, h=32, m=8):
    keys = jax.random.split(jax.random.key(seed), 6)
    p = 1 + 2 * b * k * m
    q = jax.random.normal(keys[0], (b, k, g, h), jnp.float32).astype(dtype)
    k_pool = nan_pool(p, page_size, h, dtype, keys[1])
    v_pool = nan_pool(p, page_size, h, dtype, keys[2])
    table = random_tables(b, k, m, p, keys[3])
    lengths = jnp.asarray([m * page_size, 3 * page_size + 5, 1][:b], jnp.int32)  # ragged
    n_pages = -(-np.asarray(lengths) // page_size)
    rng = np.random.default_rng(seed)
    s = m
    pages = np.zeros((b, k, gs, s), np.int32)
    counts = np.zeros((b, k, gs), np.int32)
    for i in range(b):
        for j in range(k):
            for x in range(gs):
                chosen = rng.permutation(n_pages[i])[: rng.integers(0, n_pages[i] + 1)]
                pages[i, j, x, : chosen.size] = chosen  # arbitrary order, unique
                pages[i, j, x, chosen.size:] = rng.integers(0, 100, s - chosen.size)  # junk
                counts[i, j, x] = chosen.size
    streaming = jnp.asarray([True, False][:k])
    return q, k_pool, v_pool, table, jnp.asarray(pages), jnp.asarray(counts), lengths, streaming


CASES = [(g, n_p, gs) for g in (1, 4, 8) for n_p in (16, 64) for gs in sorted({1, g})]


@pytest.mark.parametrize("g, page_size, gs", CASES)
def test_kernel_matches_reference(g, page_size, gs):
    args = _case(g, page_size, gs, jnp.bfloat16, seed=g * 100 + page_size + gs)
    ref = sparse_decode_reference(*args, sink=SINK, local=LOCAL)
    blocks = DecodeBlocks.for_shape(page_size, args[4].shape[-1], 1, block_tokens=32)
    out = sparse_decode(*args, sink=SINK, local=LOCAL, blocks=blocks, interpret=INTERPRET)
    close(out, ref, jnp.bfloat16)
    again = sparse_decode(*args, sink=SINK, local=LOCAL, blocks=blocks, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))  # deterministic
    lower_for_cuda(lambda *a: sparse_decode(*a, sink=SINK, local=LOCAL), *args)


def test_shared_lists_are_read_once_with_the_same_result():
    q, k_pool, v_pool, table, pages, counts, lengths, streaming = _case(4, 16, 4, jnp.float32, 7)
    pages = jnp.broadcast_to(pages[:, :, :1], pages.shape)  # every list of a head is list 0
    counts = jnp.broadcast_to(counts[:, :, :1], counts.shape)
    args = (q, k_pool, v_pool, table, pages, counts, lengths, streaming)
    ref = sparse_decode_reference(*args, sink=SINK, local=LOCAL)
    out = sparse_decode(*args, jnp.asarray([True, True]), sink=SINK, local=LOCAL, interpret=INTERPRET)
    close(out, ref, jnp.float32)


def test_splits_and_block_sizes_do_not_change_the_result():
    args = _case(4, 16, 1, jnp.float32, 11, m=16)
    outs = [sparse_decode(*args, sink=SINK, local=LOCAL, interpret=INTERPRET,
                          blocks=DecodeBlocks(pages_per_block=ppb, pages_per_split=pps))
            for ppb, pps in ((1, 1), (2, 8), (4, 16))]
    for out in outs[1:]:
        np.testing.assert_allclose(np.asarray(out), np.asarray(outs[0]), atol=1e-5)


def test_bad_shapes_are_rejected():
    args = list(_case(4, 16, 1, jnp.float32, 3))
    args[6] = args[6][:2]
    with pytest.raises(ValueError, match="lengths"):
        sparse_decode(*args, sink=SINK, local=LOCAL, interpret=INTERPRET)
    with pytest.raises(ValueError, match="power of two"):
        DecodeBlocks(pages_per_block=3, pages_per_split=6)
