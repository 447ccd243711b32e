"""Plain-jnp reference for Quest-style page scoring and top-K page selection.

A logical page's score is sum_h max(q_h * kmax_h, q_h * kmin_h) (no 1/sqrt(H)): an upper bound
of q.k over the page's keys. A physical page scores the max over its logical pages. Scores are
per query head, or reduced over the G query heads of a KV head (sum or max).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    table: jax.Array,  # [B, K, M] int32: logical -> physical page of this layer
    *,
    group_reduce: str = "none",
) -> jax.Array:
    """[B, K, Gs, M] f32 physical-page scores (garbage for pages the sequence does not hold)."""
    lo = kmin[table].astype(jnp.float32)  # [B, K, M, R, H]
    hi = kmax[table].astype(jnp.float32)
    qf = q.astype(jnp.float32)[:, :, :, None, None, :]  # [B, K, G, 1, 1, H]
    logical = jnp.sum(jnp.maximum(qf * hi[:, :, None], qf * lo[:, :, None]), axis=-1)
    return reduce_groups(jnp.max(logical, axis=-1), group_reduce)  # max over logical pages


def select_pages_reference(
    scores: jax.Array,  # [B, K, Gs, M] f32
    n_pages: jax.Array,  # [B] int32: pages the sequence holds (the last one is current)
    *,
    k: int,
    keep_sink_page: bool,
) -> jax.Array:
    """[B, K, Gs, k] int32: the top-k pages among 0 .. n_pages-2 (the current page is kept
    apart), best first; -1 where fewer than k pages exist. With keep_sink_page page 0 is
    always chosen."""
    page = jnp.arange(scores.shape[-1])
    valid = page[None, :] < (n_pages - 1)[:, None]  # [B, M]
    s = jnp.where(valid[:, None, None], scores, -jnp.inf)
    if keep_sink_page:
        s = jnp.where((page == 0)[None, None, None] & valid[:, None, None], jnp.inf, s)
    values, index = jax.lax.top_k(s, k)
    return jnp.where(values > -jnp.inf, index, -1).astype(jnp.int32)
