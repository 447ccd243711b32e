"""The decode lists' static width: a streaming head lists its sink pages and the pages its
decode window touches, whatever ring chunked prefill makes it keep."""

import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.config import SparsityConfig
from lserve_jax.sparsity.policy import STREAM, list_width
from pallas_kernels.sparse_decode.reference import decode_page_lists


@pytest.mark.parametrize("page_size, local, sink, chunk", [
    (16, 32, 16, 64), (16, 40, 0, 32), (64, 256, 128, 8192), (8, 5, 3, 0)])
def test_streaming_lists_fit_the_window_pages(page_size, local, sink, chunk):
    sp = SparsityConfig(policy="streaming", page_size=page_size, logical_page_size=page_size,
                        decode_local=local, decode_sink=sink, prefill_chunk=chunk)
    lengths = jnp.arange(1, 40 * page_size, dtype=jnp.int32)
    width = 64 * page_size
    _, counts = decode_page_lists(
        jnp.full((lengths.size, 1, 1, 16), -1, jnp.int32), lengths, jnp.asarray([STREAM]),
        width=width, page_size=page_size, local=local, sink_pages=sp.sink_pages,
        budget_pages=sp.budget_pages)
    assert int(counts.max()) == sp.window_pages  # reached, never exceeded
    assert list_width(sp, max_pages=width) == sp.window_pages <= sp.stream_pages
    if chunk:
        assert sp.window_pages < sp.stream_pages  # the ring is wider than the decode window
    assert np.all(np.asarray(counts) >= 1)
