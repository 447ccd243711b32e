"""Which pages each head attends to in one decode step, and the reusable page selector.

Per head mode (see policy.py):
- DENSE: every page the sequence holds.
- STREAM: the sink pages, then the pages that overlap the local window [t - local, t].
- SELECT: every page while the sequence has at most K pages (dense when the context fits the
  budget); otherwise the K - 1 pages chosen at the last selection plus the current page.
The selection reruns every `reuse_interval` decode steps; in between, the chosen pages stay in
the cache pytree (`KVCache.selected`). A page that became current after the last selection is
always attended (it is the current page); the one it replaced is dropped until the next rerun.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lserve_jax.config import SparsityConfig
from lserve_jax.sparsity.policy import SELECT, STREAM

# (q [B, K, G, H], table [B, K, M], n_pages [B]) -> [B, K, Gs, Ks] selected logical pages
Selector = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def group_reduce(sparsity: SparsityConfig) -> str:
    """How page scores of a GQA group combine: per query head, or one list per KV head."""
    return "none" if sparsity.selection_granularity == "query_head" else sparsity.group_reduction


def stream_list(n_pages: jax.Array, lengths: jax.Array, sparsity: SparsityConfig,
                width: int) -> tuple[jax.Array, jax.Array]:
    """([B, S] pages, [B] count) of a streaming head: sink pages, then the local window's pages."""
    n_p = sparsity.page_size
    sink = jnp.minimum(sparsity.sink_pages, n_pages)  # [B]
    first = jnp.maximum((lengths - 1 - sparsity.decode_local) // n_p, sparsity.sink_pages)
    first = jnp.minimum(first, n_pages)
    i = jnp.arange(width)[None, :]
    pages = jnp.where(i < sink[:, None], i, first[:, None] + i - sink[:, None])
    return pages, sink + n_pages - first


def decode_lists(q: jax.Array, table: jax.Array, selected: jax.Array, modes: jax.Array,
                 lengths: jax.Array, step: jax.Array, sparsity: SparsityConfig, width: int,
                 selector: Selector) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Page lists of one layer for one decode step.

    q: [B, K, G, H]; table: [B, K, M]; selected: [B, K, Gs, Ks] (this layer's state); modes:
    [K] int8; lengths: [B] tokens held, current included; step: decode steps taken so far.
    Returns (pages [B, K, Gs, S], counts [B, K, Gs], new selected state).
    """
    b, kh, gs, ks = selected.shape
    n_pages = (lengths + sparsity.page_size - 1) // sparsity.page_size  # [B]
    i = jnp.arange(width)
    pages = jnp.broadcast_to(i, (b, kh, gs, width))  # DENSE: every page held
    counts = jnp.broadcast_to(n_pages[:, None, None], (b, kh, gs))

    if sparsity.policy in ("streaming", "lserve"):
        s_pages, s_count = stream_list(n_pages, lengths, sparsity, width)
        is_stream = (modes == STREAM)[None, :, None]
        pages = jnp.where(is_stream[..., None], s_pages[:, None, None, :], pages)
        counts = jnp.where(is_stream, s_count[:, None, None], counts)

    if sparsity.dynamic and ks > 0:
        selected = jax.lax.cond(step % sparsity.reuse_interval == 0,
                                lambda: selector(q, table, n_pages), lambda: selected)
        n_sel = jnp.sum(selected >= 0, axis=-1)  # [B, K, Gs]
        sel_pages = jnp.where(i < n_sel[..., None], jnp.pad(
            selected, ((0, 0),) * 3 + ((0, max(0, width - ks)),))[..., :width],
            (n_pages - 1)[:, None, None, None])
        sparse = ((modes == SELECT)[None, :, None] & (n_pages[:, None, None] - 1 > ks))
        pages = jnp.where(sparse[..., None], sel_pages, pages)
        counts = jnp.where(sparse, n_sel + 1, counts)
    return pages.astype(jnp.int32), counts.astype(jnp.int32), selected
