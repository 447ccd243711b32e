"""The reusable page selector: when retrieval heads choose their pages, and how many.

Which pages each head mode attends to (dense, streaming window, selection + current page) is
defined once, by the decode op's reference (`pallas_kernels.sparse_decode.reference.
decode_page_lists`), and computed inside the kernel; this module only decides when the
selection is recomputed, and what a selection holds. It reruns every `reuse_interval` decode
steps; in between, the chosen pages stay in the cache pytree (`KVCache.selected`). The page
current at each step is always attended. With `reuse_anchor` (the default) a selection also
lists the page that was current when it was made, so once decoding crosses into the next page
a retrieval head still sees the tokens of the page it left: K - 1 selected pages + that page +
the current one, at most K + 1 pages on the up to R - 1 steps after a crossing, K otherwise.
Without it that page is dropped until the next rerun (a blind spot on the most recent tokens).
With `adaptive_p` < 1 a head keeps only the fewest of its K - 1 best pages that reach that
share of the estimated attention mass (`page_select.reference.trim_to_mass`).
"""

from __future__ import annotations

from typing import Callable

import jax

from lserve_jax.config import SparsityConfig


def group_reduce(sparsity: SparsityConfig) -> str:
    """How page scores of a GQA group combine: per query head, or one list per KV head."""
    return "none" if sparsity.selection_granularity == "query_head" else sparsity.group_reduction


def select_kwargs(sparsity: SparsityConfig, head_dim: int, groups: int) -> dict:
    """The page-select op's policy arguments (`select_pages` and its reference): how many pages,
    the anchor, and the adaptive budget's mass, floor and logit scale (1/sqrt(H), and 1/G for
    scores summed over the G query heads of a KV head)."""
    summed = group_reduce(sparsity) == "sum"
    return {"k": sparsity.budget_pages - 1, "keep_sink_page": sparsity.keep_sink_page,
            "anchor": sparsity.reuse_anchor and sparsity.reuse_interval > 1,
            "p": sparsity.adaptive_p, "floor": sparsity.adaptive_floor,
            "scale": head_dim ** -0.5 / (groups if summed else 1)}


def reuse_or_select(step: jax.Array, previous: jax.Array, select: Callable[[], jax.Array],
                    sparsity: SparsityConfig, refresh: bool | None = None) -> jax.Array:
    """This layer's selection [B, K, Gs, W] for decode step `step`: fresh every R steps.
    `refresh=True` selects now, decided at trace time (the engine's loop knows which of its R
    steps selects; the others skip this call); None decides on the device with a `lax.cond`."""
    if refresh:
        return select()
    return jax.lax.cond(step % sparsity.reuse_interval == 0, select, lambda: previous)
