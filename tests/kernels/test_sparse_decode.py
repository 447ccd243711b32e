"""Unified sparse paged decode kernel against its plain-jnp reference (interpret mode on CPU,
compiled on a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import NEG_INF, lower_for_cuda
from pallas_kernels.sparse_decode.api import query_rows, sparse_decode
from pallas_kernels.sparse_decode.kernel import DecodeBlocks
from pallas_kernels.sparse_decode.merge import merge_partials, merge_partials_reference
from pallas_kernels.layout import DENSE, SELECT, STREAM
from pallas_kernels.sparse_decode.reference import decode_page_lists, sparse_decode_reference
from tests.kernels.conftest import INTERPRET, close, nan_pool, random_tables

SINK, LOCAL, BUDGET = 20, 40, 4
MODES = np.array([[DENSE, STREAM, SELECT], [SELECT, SELECT, STREAM]])  # [L, K]


def _case(g, page_size, gs, dtype, seed, b=3, m=8, h=32, width=8):
    keys = jax.random.split(jax.random.key(seed), 6)
    n_layers, k = MODES.shape
    p = 1 + 2 * b * n_layers * k * m
    q = jax.random.normal(keys[0], (b, k, g, h), jnp.float32).astype(dtype)
    k_pool = nan_pool(p, page_size, h, dtype, keys[1])
    v_pool = nan_pool(p, page_size, h, dtype, keys[2])
    table = random_tables(b, n_layers * k, m, p, keys[3]).reshape(b, n_layers, k, m)
    # ragged: all pages full, mid-page, under the budget, a single token
    lengths = jnp.asarray([m * page_size, 5 * page_size + 7, 2 * page_size, 1][:b], jnp.int32)
    n_pages = -(-np.asarray(lengths) // page_size)
    rng = np.random.default_rng(seed)
    selected = np.full((n_layers, b, k, gs, width), -1, np.int32)
    for idx in np.ndindex(n_layers, b, k, gs):
        others = max(0, n_pages[idx[1]] - 1)
        chosen = rng.permutation(others)[: min(BUDGET - 1, others)]  # arbitrary order, unique
        selected[idx][: chosen.size] = chosen
    return (q, k_pool, v_pool, table, jnp.asarray(selected), lengths, jnp.asarray(MODES))


CASES = [(g, n_p, gs) for g in (1, 4, 8) for n_p in (16, 64) for gs in sorted({1, g})]


@pytest.mark.parametrize("g, page_size, gs", CASES)
def test_kernel_matches_reference(g, page_size, gs):
    args = _case(g, page_size, gs, jnp.bfloat16, seed=g * 100 + page_size + gs)
    kw = dict(sink=SINK, local=LOCAL, budget_pages=BUDGET)
    blocks = DecodeBlocks.for_shape(page_size, 8, 1, block_tokens=32)  # 1 page a block at 64
    for layer in (0, 1):
        ref = sparse_decode_reference(*args, layer=layer, **kw)
        out = sparse_decode(*args, layer=layer, **kw, blocks=blocks, interpret=INTERPRET)
        close(out, ref, jnp.bfloat16)
        again = sparse_decode(*args, layer=layer, **kw, blocks=blocks, interpret=INTERPRET)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(out))  # deterministic
    for lowered_blocks in (None, blocks):
        lower_for_cuda(lambda *a: sparse_decode(*a, layer=1, **kw, blocks=lowered_blocks), *args)


def test_splits_and_block_sizes_do_not_change_the_result():
    args = _case(4, 16, 1, jnp.float32, 11, m=16)
    kw = dict(layer=0, sink=SINK, local=LOCAL, budget_pages=BUDGET, interpret=INTERPRET)
    outs = [sparse_decode(*args, **kw, blocks=DecodeBlocks(pages_per_block=ppb,
                                                           pages_per_split=pps))
            for ppb, pps in ((1, 1), (1, 4), (2, 8), (4, 16))]
    for out in outs[1:]:
        np.testing.assert_allclose(np.asarray(out), np.asarray(outs[0]), atol=2e-3)


def test_page_lists_follow_the_modes():
    selected = jnp.asarray([[[[7, 2, -1, -1]], [[0, -1, -1, -1]], [[-1] * 4]]])  # [B, K, 1, W]
    lengths = jnp.asarray([10 * 16 + 3])  # 11 pages; the 11th (index 10) is current
    pages, counts = decode_page_lists(selected, lengths, jnp.asarray([SELECT, STREAM, DENSE]),
                                      width=11, page_size=16, local=40, sink_pages=2,
                                      budget_pages=3)
    pages, counts = np.asarray(pages)[0, :, 0], np.asarray(counts)[0, :, 0]
    assert pages[0, :3].tolist() == [7, 2, 10] and counts[0] == 3  # selection + current
    # window [163 - 40, 163] = pages 7..10 after sink pages 0, 1
    assert pages[1, :6].tolist() == [0, 1, 7, 8, 9, 10] and counts[1] == 6
    assert pages[2].tolist() == list(range(11)) and counts[2] == 11


def test_bad_shapes_are_rejected():
    args = list(_case(4, 16, 1, jnp.float32, 3))
    args[5] = args[5][:2]
    with pytest.raises(ValueError, match="lengths"):
        sparse_decode(*args, layer=0, sink=SINK, local=LOCAL, budget_pages=BUDGET,
                      interpret=True)
    with pytest.raises(ValueError, match="layer"):
        sparse_decode(*_case(4, 16, 1, jnp.float32, 3), layer=2, sink=SINK, local=LOCAL,
                      budget_pages=BUDGET, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        DecodeBlocks(pages_per_block=3, pages_per_split=6)


@pytest.mark.parametrize("programs, width, expected", [
    (8, 64, 2),  # B=1, one list per KV head, 4K of 64-token pages: 256 programs of 2 pages
    (64, 64, 8),  # B=8: 8 pages a split already gives 512 programs
    (32, 65, 8),  # four lists per KV head (query-head selection), B=1
    (8, 512, 8),  # a longer list fills the GPU at 8 pages a split
    (8, 4096, 16),  # ~TARGET_PROGRAMS programs: the list sets the split
])
def test_split_floor_relaxes_only_when_the_grid_is_small(programs, width, expected):
    assert DecodeBlocks.for_shape(64, width, programs).pages_per_split == expected


@pytest.mark.parametrize("s, g", [(1, 4), (3, 1), (9, 8), (20, 3), (33, 4)])
def test_merge_kernel_matches_reference(s, g):
    """Ragged partial counts (the last chunk overlaps the one before), heads that read no list
    (m NEG_INF, l 0, o 0) and NaN in the padding rows the decode kernel never writes."""
    b, kh, gp, h = 2, 3, query_rows(g), 64
    keys = jax.random.split(jax.random.key(s * 10 + g), 4)
    o = jax.random.normal(keys[0], (b, kh, s, gp, h), jnp.float32)
    m = jax.random.normal(keys[1], (b, kh, s, gp), jnp.float32) * 8
    l = jax.random.uniform(keys[2], (b, kh, s, gp), jnp.float32, 0.5, 4.0)
    idle = jax.random.bernoulli(keys[3], 0.3, (b, kh, s, gp)).at[0, 0].set(True)  # one empty
    m, l = jnp.where(idle, NEG_INF, m), jnp.where(idle, 0.0, l)
    o = jnp.where(idle[..., None], 0.0, o)
    o = o.at[:, :, :, g:].set(jnp.nan)
    ref = merge_partials_reference(o, m, l, g, jnp.bfloat16)
    out = merge_partials(o, m, l, groups=g, dtype=jnp.bfloat16, interpret=INTERPRET)
    assert out.shape == (b, kh, g, h)
    close(out, ref, jnp.bfloat16)
    assert not np.asarray(out[0, 0], np.float32).any()  # no partial: zeros, not NaN
    lower_for_cuda(lambda *a: merge_partials(*a, groups=g, dtype=jnp.bfloat16), o, m, l)
