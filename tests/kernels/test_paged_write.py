"""Paged writes: the decode append kernel (fused with RoPE, interpret mode) and the aligned
multi-token write, against the reference scatter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.paged_write.api import append_decode, write_tokens
from pallas_kernels.layout import destinations
from pallas_kernels.paged_write.reference import append_rotated_reference, write_tokens_reference
from pallas_kernels.sparse_decode.api import query_rows
from tests.kernels.conftest import INTERPRET, nan_pool, random_tables


@pytest.mark.parametrize("page_size, stats, groups", [(16, True, 4), (64, True, 1),
                                                      (64, False, 8)])
def test_append_matches_reference(page_size, stats, groups):
    """The fused decode write: rotated queries padded with zeros, key, value and statistics
    as the reference (within one bf16 rounding: the rotation's f32 products may contract into
    FMAs), and every page it does not write bit-identical."""
    keys = jax.random.split(jax.random.key(page_size + groups), 7)
    b, k, h, m = 4, 2, 32, 6
    p = 1 + 2 * b * k * m
    pools = [nan_pool(p, page_size, h, jnp.bfloat16, keys[i]) for i in range(2)]
    stat = [nan_pool(p if stats else 1, page_size, h, jnp.bfloat16, keys[2], rows=page_size // 16)
            for _ in range(2)]
    table = random_tables(b, k, m, p, keys[3])
    # a page's first token, a logical page's first token, mid-page, and an idle row
    lengths = jnp.asarray([page_size, 16, 5, 40], jnp.int32)
    qkv = jax.random.normal(keys[4], (b, k * (groups + 2), h), jnp.float32).astype(jnp.bfloat16)
    angle = jax.random.uniform(keys[5], (b, h // 2), jnp.float32, 0, 100)
    new_lens = jnp.asarray([1, 1, 1, 0], jnp.int32)
    streaming = jnp.asarray([True, False])
    args = (*pools, *stat, table, lengths, qkv, jnp.cos(angle), jnp.sin(angle), new_lens,
            streaming)
    kw = dict(q_rows=query_rows(groups), sink_pages=1, ring_pages=2, stats=stats)
    ref = append_rotated_reference(*args, **kw)
    out = append_decode(*args, **kw, interpret=INTERPRET)
    assert out[0].shape == (b, k, query_rows(groups), h)
    assert not np.asarray(out[0][:, :, groups:], np.float32).any(), "padding rows must be zero"
    phys, _ = destinations(table, lengths, new_lens, streaming, 1, page_size, sink_pages=1,
                           ring_pages=2)
    written = np.isin(np.arange(p), np.asarray(phys))
    written[0] = True  # the trash page takes what must not land (the reference drops it)
    np.testing.assert_allclose(np.asarray(out[0], np.float32), np.asarray(ref[0], np.float32),
                               rtol=2 ** -7, atol=1e-6)
    for a, c in zip(ref[1:], out[1:]):
        np.testing.assert_allclose(np.asarray(c[1:], np.float32), np.asarray(a[1:], np.float32),
                                   rtol=2 ** -7, atol=1e-6, equal_nan=True)
        if a.shape[0] == p:  # pages (and their statistics) it does not write are untouched
            np.testing.assert_array_equal(np.asarray(a[~written]).view(np.uint16),
                                          np.asarray(c[~written]).view(np.uint16))
    lower_for_cuda(lambda *a: append_decode(*a, **kw), *args)


def test_append_rejects_a_bad_projection_shape():
    pool = jnp.zeros((3, 16, 32), jnp.bfloat16)
    stat = jnp.zeros((3, 1, 32), jnp.bfloat16)
    table = jnp.ones((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match="qkv"):
        append_decode(pool, pool, stat, stat, table, jnp.zeros(1, jnp.int32),
                      jnp.zeros((1, 7, 32), jnp.bfloat16), jnp.ones((1, 16)),
                      jnp.zeros((1, 16)), jnp.ones(1, jnp.int32), jnp.asarray([False, False]),
                      q_rows=16, sink_pages=1, ring_pages=2)


@pytest.mark.parametrize("page_size", [16, 64])
def test_aligned_prefill_write_matches_reference(page_size):
    """The per-logical-page reduction used by prefill and chunks equals the scatter-min."""
    keys = jax.random.split(jax.random.key(7 + page_size), 5)
    b, k, h, m, t = 3, 2, 16, 8, 100
    p = 1 + 2 * b * k * m
    pools = [nan_pool(p, page_size, h, jnp.bfloat16, keys[i]) for i in range(2)]
    stat = [nan_pool(p, page_size, h, jnp.bfloat16, keys[2], rows=page_size // 16)
            for _ in range(2)]
    table = random_tables(b, k, m, p, keys[3])
    lengths = jnp.asarray([0, 32, 0], jnp.int32)  # logical-page aligned starts
    new = jax.random.normal(keys[4], (b, t, k, h), jnp.float32).astype(jnp.bfloat16)
    new_lens = jnp.asarray([100, 37, 0], jnp.int32)  # ragged, not page multiples, one idle
    args = (*pools, *stat, table, lengths, new, -new, new_lens, jnp.asarray([True, False]))
    kw = dict(sink_pages=1, ring_pages=2, stats=True)
    ref = write_tokens_reference(*args, **kw)
    out = write_tokens(*args, **kw, aligned=True)
    for a, c in zip(ref, out):
        np.testing.assert_array_equal(np.asarray(a[1:]).view(np.uint16),
                                      np.asarray(c[1:]).view(np.uint16))
