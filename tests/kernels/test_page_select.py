"""Page scoring kernel (interpret mode) against its reference; selection semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.page_select.api import page_scores, select_pages
from pallas_kernels.page_select.reference import page_scores_reference
from tests.kernels.conftest import INTERPRET, nan_pool, random_tables


@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("group_reduce", ["none", "sum", "max"])
def test_scores_match_reference(g, page_size, group_reduce):
    keys = jax.random.split(jax.random.key(g + page_size), 5)
    b, k, h, m, rows = 2, 2, 32, 40, page_size // 16
    p = 1 + 2 * b * k * m
    kmin = nan_pool(p, page_size, h, jnp.bfloat16, keys[0], rows=rows)
    kmax = kmin + jnp.abs(nan_pool(p, page_size, h, jnp.bfloat16, keys[1], rows=rows))
    table = random_tables(b, k, m, p, keys[2])
    held = 27  # pages the rows hold; the rest of the table points at the NaN trash page
    table = jnp.where(jnp.arange(m) < held, table, 0)
    q = jax.random.normal(keys[3], (b, k, g, h), jnp.bfloat16)
    ref = page_scores_reference(q, kmin, kmax, table, group_reduce=group_reduce)
    out = page_scores(q, kmin, kmax, table, group_reduce=group_reduce, interpret=INTERPRET)
    ref, out = np.asarray(ref)[..., :held], np.asarray(out)[..., :held]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
    lower_for_cuda(lambda *a: page_scores(*a, group_reduce=group_reduce), q, kmin, kmax, table)


def test_selection_skips_the_current_page_and_pads():
    scores = jnp.asarray([[[[5.0, 1.0, 9.0, 3.0, 8.0, 7.0]]], [[[5.0, 1.0, 9.0, 3.0, 8.0, 7.0]]]])
    n_pages = jnp.asarray([5, 3])  # row 0: page 4 is current; row 1: only pages 0, 1 compete
    chosen = np.asarray(select_pages(scores, n_pages, k=3, keep_sink_page=False))
    assert chosen[0, 0, 0].tolist() == [2, 0, 3] and chosen[1, 0, 0].tolist() == [0, 1, -1]
    sink = np.asarray(select_pages(scores, n_pages, k=2, keep_sink_page=True))
    assert sink[0, 0, 0].tolist() == [0, 2]
