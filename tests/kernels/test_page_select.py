"""Page scoring and radix top-k kernels against their references: mixed SELECT / STREAM /
DENSE heads, ragged lengths, NaN statistics wherever a kernel must not read (pages past each
row's length, heads that do not select, garbage page ids), ties, every radix width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import NEG_INF, lower_for_cuda
from pallas_kernels.page_select.api import page_scores, select_pages
from pallas_kernels.layout import DENSE, SELECT, STREAM
from pallas_kernels.page_select.kernel import ScoreBlocks, SelectTuning, top_pages
from pallas_kernels.page_select.reference import page_scores_reference, select_pages_reference
from tests.kernels.conftest import INTERPRET, nan_pool, random_tables

MODES = np.array([[SELECT, STREAM, DENSE], [STREAM, SELECT, SELECT]])  # [L, K]


def _case(g, page_size, seed, b=3, m=40, h=32):
    """Statistics of held pages are finite; every other table entry names a NaN page or a
    page id past the pool. Half of the held entries repeat an earlier page (equal scores)."""
    n_layers, k = MODES.shape
    keys = jax.random.split(jax.random.key(seed), 4)
    rows = page_size // 16
    p = 5 * (2 * b * n_layers * k * m // 5) + 1  # pages 0, 5, ..., p - 1 are NaN
    kmin = nan_pool(p, page_size, h, jnp.bfloat16, keys[0], rows=rows)
    kmax = kmin + jnp.abs(nan_pool(p, page_size, h, jnp.bfloat16, keys[1], rows=rows))
    table = np.asarray(random_tables(b, n_layers * k, m, p, keys[2])).reshape(b, n_layers, k, m)
    rng = np.random.default_rng(seed)
    table = np.where(rng.random(table.shape) < 0.5, table[..., np.arange(m) % 5], table)
    lengths = np.asarray([m * page_size, 27 * page_size - 3, page_size + 1][:b], np.int32)
    held = (np.arange(m) < -(-lengths // page_size)[:, None, None, None]) & (MODES == SELECT)[
        None, ..., None]
    trash = rng.choice([0, 5 * rng.integers(1, p // 5), p + 1000], size=table.shape)
    q = jax.random.normal(keys[3], (b, k, g, h), jnp.bfloat16)
    return (q, kmin, kmax, jnp.asarray(np.where(held, table, trash), jnp.int32),
            jnp.asarray(lengths), jnp.asarray(MODES, jnp.int8))


@pytest.mark.parametrize("g, page_size, group_reduce, layer", [
    (1, 16, "none", 1), (4, 64, "none", 0), (4, 16, "sum", 1), (8, 64, "max", 1)])
def test_scores_match_reference(g, page_size, group_reduce, layer):
    args = _case(g, page_size, g + page_size)
    kw = {"layer": layer, "page_size": page_size, "group_reduce": group_reduce}
    ref = np.asarray(page_scores_reference(*args, **kw))
    blocks = ScoreBlocks(pages_per_block=16, pages_per_program=32)  # 2 blocks per program
    out = np.asarray(page_scores(*args, **kw, blocks=blocks, interpret=INTERPRET))
    assert np.isfinite(out).all(), "NaN statistics leaked into the scores"
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
    assert (out[:, MODES[layer] != SELECT] == NEG_INF).all()
    assert (out[2, MODES[layer] == SELECT][..., 2:] == NEG_INF).all()  # row 2 holds 2 pages


@pytest.mark.parametrize("g, page_size, group_reduce, radix_bits, keep_sink", [
    (1, 16, "none", 4, False), (4, 64, "none", 2, True), (4, 16, "sum", 1, False),
    (8, 64, "max", 4, True)])
def test_selection_matches_reference(g, page_size, group_reduce, radix_bits, keep_sink):
    args = _case(g, page_size, 7 * g + page_size)
    lengths, modes = args[4:]
    kw = {"k": 5, "width": 8, "page_size": page_size, "keep_sink_page": keep_sink}
    scores = page_scores_reference(*args, layer=1, page_size=page_size,
                                   group_reduce=group_reduce)
    ref = np.asarray(select_pages_reference(scores, lengths, modes[1], **kw))
    tuning = SelectTuning(radix_bits=radix_bits)
    out = select_pages(*args, layer=1, group_reduce=group_reduce, tuning=tuning,
                       interpret=INTERPRET, **kw)
    np.testing.assert_array_equal(np.asarray(out), ref)
    assert (ref[:, MODES[1] != SELECT] == -1).all() and (ref[:2, MODES[1] == SELECT] >= 0).any()
    blocks = ScoreBlocks(pages_per_block=16, pages_per_program=32, num_warps=8)
    for lowered in (None, blocks):
        lower_for_cuda(lambda *a, lowered=lowered: select_pages(
            *a, layer=1, group_reduce=group_reduce, tuning=tuning, blocks=lowered, **kw),
            *args)


@pytest.mark.parametrize("radix_bits, chunk", [(1, None), (2, 8), (4, 16)])
def test_radix_top_k_breaks_ties_like_the_reference(radix_bits, chunk):
    """Scores from {-2, -1, 0, 1} (many ties at the k-th value), NaN past each row's pages;
    a row with fewer candidates than k; k == width; keep_sink_page on and off; rows walked
    in one or several chunks."""
    rng = np.random.default_rng(radix_bits)
    b, k_heads, gs, m, page_size = 4, 3, 2, 32, 16
    scores = rng.integers(-2, 2, (b, k_heads, gs, m)).astype(np.float32)
    lengths = np.asarray([m * page_size, 20 * page_size - 5, 4 * page_size, 1], np.int32)
    held = np.arange(m) < -(-lengths // page_size)[:, None, None, None]
    scores = jnp.asarray(np.where(held, scores, np.nan))
    modes = jnp.asarray(MODES, jnp.int32)
    for k, width, keep_sink in ((5, 8, False), (6, 8, True), (8, 8, False)):
        kw = {"k": k, "width": width, "page_size": page_size, "keep_sink_page": keep_sink}
        out = top_pages(scores, jnp.asarray(lengths), modes, jnp.ones((1,), jnp.int32), groups=gs,
                        radix_bits=radix_bits, chunk=chunk, interpret=INTERPRET, **kw)
        ref = select_pages_reference(scores, jnp.asarray(lengths), modes[1], **kw)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_score_blocks_for_shape_fill_the_gpu():
    for width, rows in ((4096, 8), (2048, 64), (512, 8), (8, 1), (1 << 16, 256)):
        blocks = ScoreBlocks.for_shape(width, rows)
        programs = rows * max(width, blocks.pages_per_program) // blocks.pages_per_program
        assert blocks.pages_per_program >= blocks.pages_per_block >= 16
        target = SelectTuning().target_programs
        assert programs <= target
        assert programs > target // 2 or blocks.pages_per_program == blocks.pages_per_block


def test_bad_arguments_name_the_field():
    args = _case(1, 16, 0)
    kw = {"layer": 1, "k": 5, "width": 8, "page_size": 16}
    with pytest.raises(ValueError, match="radix_bits"):
        SelectTuning(radix_bits=3)
    with pytest.raises(ValueError, match="modes"):
        select_pages(*args[:5], args[5][:1], **kw)
    with pytest.raises(ValueError, match="width"):
        select_pages(*args, **{**kw, "width": 12})


def test_selection_skips_the_current_page_keeps_the_sink_and_pads():
    scores = jnp.asarray([[[[5.0, 1.0, 9.0, 3.0, 8.0, 7.0, 0.0, 0.0]]]] * 2)
    lengths = jnp.asarray([5 * 16, 3 * 16 - 4])  # 5 pages (page 4 current); 3 pages
    kw = {"width": 4, "page_size": 16}
    modes = jnp.asarray([SELECT])
    chosen = np.asarray(select_pages_reference(scores, lengths, modes, k=3,
                                               keep_sink_page=False, **kw))
    assert chosen[0, 0, 0].tolist() == [0, 2, 3, -1] and chosen[1, 0, 0].tolist() == [0, 1, -1, -1]
    sink = np.asarray(select_pages_reference(scores, lengths, modes, k=2, keep_sink_page=True,
                                             **kw))
    assert sink[0, 0, 0].tolist() == [0, 2, -1, -1]
    stream = select_pages_reference(scores, lengths, jnp.asarray([STREAM]), k=2,
                                    keep_sink_page=True, **kw)
    assert (np.asarray(stream) == -1).all()
