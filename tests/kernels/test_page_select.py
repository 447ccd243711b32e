"""Page scoring and radix top-k kernels against their references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.page_select.api import page_scores, select_pages
from pallas_kernels.page_select.reference import page_scores_reference, select_pages_reference
from tests.kernels.conftest import INTERPRET, nan_pool, random_tables


def _case(g, page_size, seed, b=3, n_layers=2, k=2, h=32, m=40):
    keys = jax.random.split(jax.random.key(seed), 5)
    rows = page_size // 16
    p = 1 + 2 * b * n_layers * k * m
    kmin = nan_pool(p, page_size, h, jnp.bfloat16, keys[0], rows=rows)
    kmax = kmin + jnp.abs(nan_pool(p, page_size, h, jnp.bfloat16, keys[1], rows=rows))
    table = random_tables(b, n_layers * k, m, p, keys[2]).reshape(b, n_layers, k, m)
    lengths = jnp.asarray([m * page_size, 27 * page_size - 3, page_size + 1][:b], jnp.int32)
    held = -(-lengths // page_size)
    table = jnp.where(jnp.arange(m) < held[:, None, None, None], table, 0)  # rest: NaN trash
    q = jax.random.normal(keys[3], (b, k, g, h), jnp.bfloat16)
    return q, kmin, kmax, table, lengths


@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("group_reduce", ["none", "sum", "max"])
def test_scores_and_selection_match_reference(g, page_size, group_reduce):
    q, kmin, kmax, table, lengths = _case(g, page_size, g + page_size)
    held = int(-(-lengths[1] // page_size))
    ref = page_scores_reference(q, kmin, kmax, table, layer=1, group_reduce=group_reduce)
    out = page_scores(q, kmin, kmax, table, layer=1, group_reduce=group_reduce,
                      interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(out)[1, ..., :held], np.asarray(ref)[1, ..., :held],
                               rtol=1e-4, atol=1e-3)
    kw = dict(k=5, width=8, page_size=page_size, keep_sink_page=group_reduce == "max")
    chosen = select_pages(q, kmin, kmax, table, lengths, layer=1, group_reduce=group_reduce,
                          interpret=INTERPRET, **kw)
    np.testing.assert_array_equal(np.asarray(chosen),
                                  np.asarray(select_pages_reference(ref, lengths, **kw)))
    lower_for_cuda(lambda *a: select_pages(*a, layer=1, group_reduce=group_reduce, **kw),
                   q, kmin, kmax, table, lengths)


def test_selection_skips_the_current_page_keeps_the_sink_and_pads():
    scores = jnp.asarray([[[[5.0, 1.0, 9.0, 3.0, 8.0, 7.0, 0.0, 0.0]]]] * 2)
    lengths = jnp.asarray([5 * 16, 3 * 16 - 4])  # 5 pages (page 4 current); 3 pages
    kw = dict(width=4, page_size=16)
    chosen = np.asarray(select_pages_reference(scores, lengths, k=3, keep_sink_page=False, **kw))
    assert chosen[0, 0, 0].tolist() == [0, 2, 3, -1] and chosen[1, 0, 0].tolist() == [0, 1, -1, -1]
    sink = np.asarray(select_pages_reference(scores, lengths, k=2, keep_sink_page=True, **kw))
    assert sink[0, 0, 0].tolist() == [0, 2, -1, -1]
