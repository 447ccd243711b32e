"""Plain-jnp reference for Quest-style page scoring and top-K page selection.

A logical page's score is sum_h max(q_h * kmax_h, q_h * kmin_h) (no 1/sqrt(H)): an upper bound
of q.k over the page's keys. A physical page scores the max over its logical pages. Scores are
per query head, or reduced over the G query heads of a KV head (sum or max). Only heads whose
mode is SELECT are scored, and only over the pages their row holds; selection lists of the
other heads are all -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._compat import NEG_INF
from pallas_kernels.layout import SELECT


def reduce_groups(scores: jax.Array, group_reduce: str) -> jax.Array:
    """[B, K, G, M] -> [B, K, Gs, M]: 'none' keeps every query head, 'sum'/'max' make Gs = 1."""
    if group_reduce == "none":
        return scores
    if group_reduce == "sum":
        return jnp.sum(scores, axis=2, keepdims=True)
    if group_reduce == "max":
        return jnp.max(scores, axis=2, keepdims=True)
    raise ValueError(f"group_reduce={group_reduce!r} is invalid: use 'none', 'sum' or 'max'")


def page_scores_reference(
    q: jax.Array,  # [B, K, G, H]
    kmin: jax.Array,  # [P, Np/Nl, H]
    kmax: jax.Array,  # [P, Np/Nl, H]
    table: jax.Array,  # [B, L, K, M] int32 logical -> physical page
    lengths: jax.Array,  # [B] int32 tokens held
    modes: jax.Array,  # [L, K] int DENSE / SELECT / STREAM
    *,
    layer: int,
    page_size: int,
    group_reduce: str = "none",
) -> jax.Array:
    """[B, K, Gs, M] f32 physical-page scores; NEG_INF for pages at or past
    ceil(length / page_size) and for heads whose mode is not SELECT (their statistics may be
    garbage: they are masked, never used)."""
    n_pages = (lengths + page_size - 1) // page_size
    scored = ((jnp.arange(table.shape[3]) < n_pages[:, None])[:, None, None]
              & (modes[layer] == SELECT)[None, :, None, None])  # [B, K, 1, M]
    table = table[:, layer]
    lo = kmin[table].astype(jnp.float32)  # [B, K, M, R, H]
    hi = kmax[table].astype(jnp.float32)
    qf = q.astype(jnp.float32)[:, :, :, None, None, :]  # [B, K, G, 1, 1, H]
    logical = jnp.sum(jnp.maximum(qf * hi[:, :, None], qf * lo[:, :, None]), axis=-1)
    scores = reduce_groups(jnp.max(logical, axis=-1), group_reduce)  # max over logical pages
    return jnp.where(scored, scores, NEG_INF)


def select_pages_reference(
    scores: jax.Array,  # [B, K, Gs, M'] f32 (M' >= pages any row holds)
    lengths: jax.Array,  # [B] int32 tokens held (the page of the last one is current)
    modes: jax.Array,  # [K] int this layer's DENSE / SELECT / STREAM
    *,
    k: int,
    width: int,
    page_size: int,
    keep_sink_page: bool,
    anchor: bool = False,
    p: float = 1.0,
    floor: int = 1,
    scale: float = 1.0,
) -> jax.Array:
    """[B, K, Gs, width] int32: the k best pages among 0 .. n_pages-2 (the current page is kept
    apart) in ascending page order, then -1; all -1 for heads whose mode is not SELECT. With
    keep_sink_page page 0 is always chosen. Ties go to the lower page. p < 1 keeps only the
    fewest of them that reach mass p (`trim_to_mass`); `anchor` lists the current page after
    them (`with_anchor`)."""
    n_pages = (lengths + page_size - 1) // page_size
    page = jnp.arange(scores.shape[-1])
    valid = ((page[None, :] < (n_pages - 1)[:, None])[:, None, None]
             & (modes == SELECT)[None, :, None, None])  # [B, K, 1, M']
    s = jnp.where(valid, scores, -jnp.inf)
    if keep_sink_page:
        s = jnp.where((page == 0) & valid, jnp.inf, s)
    values, index = jax.lax.top_k(s, min(k, s.shape[-1]))
    chosen = jnp.where(values > -jnp.inf, index, scores.shape[-1])
    chosen = jnp.sort(chosen, axis=-1)
    chosen = jnp.where(chosen < scores.shape[-1], chosen, -1)
    pad = width - chosen.shape[-1]
    chosen = jnp.pad(chosen, ((0, 0),) * 3 + ((0, pad),), constant_values=-1).astype(jnp.int32)
    if p < 1.0:
        chosen = trim_to_mass(chosen, scores, lengths, page_size=page_size, p=p, floor=floor,
                              scale=scale, keep_sink_page=keep_sink_page)
    return with_anchor(chosen, lengths, modes, page_size=page_size) if anchor else chosen


def trim_to_mass(chosen: jax.Array, scores: jax.Array, lengths: jax.Array, *, page_size: int,
                 p: float, floor: int, scale: float, keep_sink_page: bool = False
                 ) -> jax.Array:
    """The adaptive budget (top-p over pages). chosen: [B, K, Gs, W] ascending pages, -1 padded;
    scores: [B, K, Gs, M'] page score bounds. The estimated attention mass of a page is its share
    of softmax(scale * scores) over the pages it could have been chosen from (the row's pages
    before the current one, which is attended anyway and whose bound also covers statistics
    slots not written yet). Keeps the fewest chosen pages, best first, whose mass reaches p, and
    at least `floor` of them (all when fewer are chosen); ascending, -1 padded. With
    keep_sink_page page 0, when chosen, ranks first."""
    n_pages = (lengths + page_size - 1) // page_size
    earlier = (jnp.arange(scores.shape[-1]) < (n_pages - 1)[:, None])[:, None, None]
    logits = jnp.where(earlier, scores.astype(jnp.float32) * scale, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    listed = chosen >= 0
    own = jnp.take_along_axis(logits, jnp.maximum(chosen, 0), axis=-1)
    own = jnp.where(listed, own, -jnp.inf)
    first = (chosen == 0) & keep_sink_page
    order = jnp.argsort(-jnp.where(first, jnp.inf, own), axis=-1, stable=True)  # ties: lower page
    mass = jnp.exp(jnp.take_along_axis(own, order, axis=-1) - lse)
    before = jnp.cumsum(mass, axis=-1) - mass
    keep = jnp.maximum(jnp.sum((before < p) & jnp.isfinite(before), axis=-1), floor)
    rank = jnp.argsort(order, axis=-1)  # each entry's place in the best-first order
    kept = listed & (rank < keep[..., None])
    big = jnp.iinfo(jnp.int32).max
    kept = jnp.sort(jnp.where(kept, chosen, big), axis=-1)
    return jnp.where(kept == big, -1, kept).astype(jnp.int32)


def with_anchor(chosen: jax.Array, lengths: jax.Array, modes: jax.Array, *,
                page_size: int) -> jax.Array:
    """chosen [B, K, Gs, W] (ascending, -1 padded, fewer than W entries) with the current page
    listed after the selected ones for SELECT heads: the page stays in the selection's list
    when later steps reuse it (`sparse_decode` then attends to it and to the page current at
    that step, once when they are the same)."""
    n_pages = (lengths + page_size - 1) // page_size
    n_sel = jnp.sum(chosen >= 0, axis=-1, keepdims=True)
    slot = (jnp.arange(chosen.shape[-1]) == n_sel) & (modes == SELECT)[None, :, None, None]
    return jnp.where(slot, (n_pages - 1)[:, None, None, None], chosen).astype(jnp.int32)
