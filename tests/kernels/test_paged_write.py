"""Decode KV-append kernel (interpret mode): bit-exact against the reference scatter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.paged_write.api import write_tokens
from pallas_kernels.paged_write.reference import write_tokens_reference
from tests.kernels.conftest import INTERPRET, nan_pool, random_tables


@pytest.mark.parametrize("page_size, stats", [(16, True), (64, True), (64, False)])
def test_append_matches_reference_bit_for_bit(page_size, stats):
    keys = jax.random.split(jax.random.key(page_size), 6)
    b, k, h, m = 4, 2, 32, 6
    p = 1 + 2 * b * k * m
    pools = [nan_pool(p, page_size, h, jnp.bfloat16, keys[i]) for i in range(2)]
    stat = [nan_pool(p if stats else 1, page_size, h, jnp.bfloat16, keys[2], rows=page_size // 16)
            for _ in range(2)]
    table = random_tables(b, k, m, p, keys[3])
    # a page's first token, a logical page's first token, mid-page, and an idle row
    lengths = jnp.asarray([page_size, 16, 5, 40], jnp.int32)
    new = jax.random.normal(keys[4], (b, 1, k, h), jnp.float32).astype(jnp.bfloat16)
    new_lens = jnp.asarray([1, 1, 1, 0], jnp.int32)
    streaming = jnp.asarray([True, False])
    args = (*pools, *stat, table, lengths, new, new * 2, new_lens, streaming)
    kw = dict(sink_pages=1, ring_pages=2, stats=stats)
    ref = write_tokens_reference(*args, **kw)
    out = write_tokens(*args, **kw, interpret=INTERPRET)
    for a, c in zip(ref, out):  # everything but the trash page is bit-identical
        np.testing.assert_array_equal(np.asarray(a[1:]).view(np.uint16),
                                      np.asarray(c[1:]).view(np.uint16))
    lower_for_cuda(lambda *a: write_tokens(*a, **kw), *args)


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
    out = write_tokens(*args, **kw, aligned=True, interpret=INTERPRET)
    for a, c in zip(ref, out):
        np.testing.assert_array_equal(np.asarray(a[1:]).view(np.uint16),
                                      np.asarray(c[1:]).view(np.uint16))
