"""The anchored selection (the page current at a selection stays listed while later steps reuse
it) and the adaptive budget (top-p over pages), in the page-select and decode ops: references
against brute force built from Python sets and sorted numpy scores, kernels against references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.layout import SELECT, STREAM
from pallas_kernels.page_select.api import select_pages
from pallas_kernels.page_select.reference import (page_scores_reference, select_pages_reference,
                                                  trim_to_mass, with_anchor)
from pallas_kernels.sparse_decode.api import sparse_decode
from pallas_kernels.sparse_decode.reference import decode_page_lists, sparse_decode_reference
from tests.kernels.conftest import INTERPRET, close, nan_pool, random_tables
from tests.kernels.test_page_select import _case as select_case

R, N_P, M, BUDGET = 4, 16, 12, 4


def _reuse_rows(seed):
    """Every (selection offset within its page, steps since the selection) pair for R = 4:
    selections made at positions t0 with t0 % 16 in 12..15 and decoded 0..3 steps later, so
    decoding crosses into the next page at every offset within R (and, from offset 12, not at
    all). Returns (selection lengths, decode lengths, selections [B, 1, 1, W] anchored)."""
    rng = np.random.default_rng(seed)
    t0 = np.asarray([8 * N_P + off for off in range(12, 16) for _ in range(R)])
    steps = np.tile(np.arange(R), 4)
    width = 16
    picked = np.full((t0.size, 1, 1, width), -1, np.int32)
    for row, t in enumerate(t0):
        picked[row, 0, 0, : BUDGET - 1] = np.sort(rng.permutation(t // N_P)[: BUDGET - 1])
    anchored = with_anchor(jnp.asarray(picked), jnp.asarray(t0 + 1), jnp.asarray([SELECT]),
                           page_size=N_P)
    return t0 + 1, t0 + 1 + steps, picked, np.asarray(anchored)


@pytest.mark.parametrize("anchor", [True, False])
def test_reused_lists_keep_the_page_current_at_selection(anchor):
    sel_len, lengths, picked, anchored = _reuse_rows(0)
    selected = anchored if anchor else picked
    pages, counts = decode_page_lists(jnp.asarray(selected), jnp.asarray(lengths),
                                      jnp.asarray([SELECT]), width=M, page_size=N_P, local=0,
                                      sink_pages=0, budget_pages=BUDGET)
    pages, counts = np.asarray(pages)[:, 0, 0], np.asarray(counts)[:, 0, 0]
    crossed = 0
    for row in range(len(lengths)):
        current, at_selection = (lengths[row] - 1) // N_P, (sel_len[row] - 1) // N_P
        want = set(picked[row, 0, 0][picked[row, 0, 0] >= 0]) | {current}
        if anchor:
            want.add(at_selection)
        listed = pages[row, : counts[row]].tolist()
        assert len(listed) == len(set(listed)) and set(listed) == want, (row, listed, want)
        crossed += current != at_selection
    assert crossed == 6  # offsets 13, 14, 15 cross at steps 3, 2-3 and 1-3


def _masked_attention(q, keys, values, visible):
    """Brute force: softmax over the visible keys. q [G, H]; keys, values [T, H]."""
    logits = q @ keys.T / np.sqrt(q.shape[-1])
    logits = np.where(visible[None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ np.where(visible[:, None], values, 0.0)


@pytest.mark.parametrize("anchor", [True, False])
def test_decode_attends_to_the_anchored_lists(anchor):
    """Kernel and reference against attention over exactly the listed pages' tokens up to the
    current one, at every crossing offset; unused pages hold NaN."""
    sel_len, lengths, picked, anchored = _reuse_rows(1)
    selected = jnp.asarray(anchored if anchor else picked)[None]  # [L=1, B, K=1, 1, W]
    b, g, h = len(lengths), 4, 32
    keys = jax.random.split(jax.random.key(2), 4)
    p = 1 + 2 * b * M
    k_pool, v_pool = (nan_pool(p, N_P, h, jnp.float32, key) for key in keys[:2])
    table = random_tables(b, 1, M, p, keys[2]).reshape(b, 1, 1, M)
    q = jax.random.normal(keys[3], (b, 1, g, h), jnp.float32)
    args = (q, k_pool, v_pool, table, selected, jnp.asarray(lengths, jnp.int32),
            jnp.asarray([[SELECT]]))
    kw = dict(layer=0, sink=0, local=0, budget_pages=BUDGET)
    ref = np.asarray(sparse_decode_reference(*args, **kw))
    out = sparse_decode(*args, **kw, max_listed=BUDGET + 1, interpret=INTERPRET)
    close(out, ref, jnp.float32)
    for row in range(b):
        listed = set(picked[row, 0, 0][picked[row, 0, 0] >= 0]) | {(lengths[row] - 1) // N_P}
        if anchor:
            listed.add((sel_len[row] - 1) // N_P)
        pos = np.arange(M * N_P)
        visible = np.isin(pos // N_P, list(listed)) & (pos < lengths[row])
        phys = np.asarray(table)[row, 0, 0]
        ks = np.nan_to_num(np.asarray(k_pool)[phys].reshape(-1, h))
        vs = np.nan_to_num(np.asarray(v_pool)[phys].reshape(-1, h))
        np.testing.assert_allclose(ref[row, 0], _masked_attention(
            np.asarray(q)[row, 0], ks, vs, visible), atol=1e-5)
    lower_for_cuda(lambda *a: sparse_decode(*a, **kw, max_listed=BUDGET + 1), *args)


def _mass_brute_force(scores, n_pages, chosen, p, floor, scale):
    """The pages trim_to_mass keeps, from sorted numpy: the chosen pages best first until their
    shares of the mass of the pages before the current one reach p; at least `floor`."""
    if n_pages < 2:
        return []
    logits = scores[: n_pages - 1] * scale
    share = np.exp(logits - logits.max())
    share /= share.sum()
    order = sorted((int(c) for c in chosen if c >= 0), key=lambda c: (-scores[c], c))
    total, keep = 0.0, []
    for page in order:
        if total >= p and len(keep) >= floor:
            break
        keep.append(page)
        total += share[page]
    return sorted(keep)


@pytest.mark.parametrize("p, floor", [(0.5, 1), (0.9, 2), (0.99, 1), (0.3, 3)])
def test_adaptive_budget_keeps_the_fewest_pages_reaching_the_mass(p, floor):
    rng = np.random.default_rng(int(p * 100) + floor)
    b, k, m = 6, 8, 40
    scores = rng.normal(0, 3, (b, 1, 1, m)).astype(np.float32)
    lengths = np.asarray([40, 33, 17, 9, 3, 1]) * N_P - rng.integers(0, N_P, b)
    lengths = np.maximum(lengths, 1)
    chosen = select_pages_reference(jnp.asarray(scores), jnp.asarray(lengths),
                                    jnp.asarray([SELECT]), k=k, width=16, page_size=N_P,
                                    keep_sink_page=False)
    kept = np.asarray(trim_to_mass(chosen, jnp.asarray(scores), jnp.asarray(lengths),
                                   page_size=N_P, p=p, floor=floor, scale=0.7))
    sizes = []
    for row in range(b):
        n_pages = -(-lengths[row] // N_P)
        want = _mass_brute_force(scores[row, 0, 0], n_pages, np.asarray(chosen)[row, 0, 0], p,
                                 floor, 0.7)
        assert kept[row, 0, 0].tolist() == want + [-1] * (16 - len(want)), row
        sizes.append(len(want))
    assert min(sizes) < k < 40 and max(sizes) > 1  # the mass, not the cap, sets the count


def test_adaptive_and_anchored_selection_kernel_matches_reference():
    q, kmin, kmax, table, lengths, modes = select_case(4, 16, seed=5)
    kw = dict(layer=1, k=7, width=16, page_size=16, keep_sink_page=True, anchor=True, p=0.5,
              floor=2, scale=1.0)
    scores = page_scores_reference(q, kmin, kmax, table, lengths, modes, layer=1, page_size=16)
    ref = np.asarray(select_pages_reference(scores, lengths, modes[1], **{
        k: v for k, v in kw.items() if k != "layer"}))
    out = np.asarray(select_pages(q, kmin, kmax, table, lengths, modes, **kw,
                                  interpret=INTERPRET))
    np.testing.assert_array_equal(out, ref)
    n_pages = -(-np.asarray(lengths) // 16)
    listed = (ref >= 0).sum(-1)
    select = np.asarray(modes[1]) == SELECT
    assert (ref[:, ~select] == -1).all()
    last = np.take_along_axis(ref, np.maximum(listed - 1, 0)[..., None], -1)[..., 0]
    assert (last[:, select] == (n_pages - 1)[:, None, None]).all()  # the anchor ends each list
    assert (listed[0, select] < 8).any()  # the mass trimmed some of the 7 pages
    lower_for_cuda(lambda *a: select_pages(*a, **kw), q, kmin, kmax, table, lengths, modes)


def test_anchor_needs_room_in_the_selection_row():
    q, kmin, kmax, table, lengths, modes = select_case(1, 16, seed=0)
    with pytest.raises(ValueError, match="anchor"):
        select_pages(q, kmin, kmax, table, lengths, modes, layer=1, k=8, width=8, page_size=16,
                     anchor=True, interpret=True)
    stream = with_anchor(jnp.full((1, 1, 1, 4), -1), jnp.asarray([40]), jnp.asarray([STREAM]),
                         page_size=16)
    assert (np.asarray(stream) == -1).all()  # only SELECT heads list pages
