"""The reusable page selector: when retrieval heads choose their pages, and how many.

Which pages each head mode attends to (dense, streaming window, selection + current page) is
defined once, by the decode op's reference (`pallas_kernels.sparse_decode.reference.
decode_page_lists`), and computed inside the kernel; this module only decides when the
selection is recomputed. It reruns every `reuse_interval` decode steps; in between, the chosen
pages stay in the cache pytree (`KVCache.selected`). A page that became current after the last
selection is always attended (it is the current page); the one it replaced is dropped until
the next rerun.
"""

from __future__ import annotations

from typing import Callable

import jax

from lserve_jax.config import SparsityConfig


def group_reduce(sparsity: SparsityConfig) -> str:
    """How page scores of a GQA group combine: per query head, or one list per KV head."""
    return "none" if sparsity.selection_granularity == "query_head" else sparsity.group_reduction


def reuse_or_select(step: jax.Array, previous: jax.Array, select: Callable[[], jax.Array],
                    sparsity: SparsityConfig, refresh: bool | None = None) -> jax.Array:
    """This layer's selection [B, K, Gs, W] for decode step `step`: fresh every R steps.
    `refresh=True` selects now, decided at trace time (the engine's loop knows which of its R
    steps selects; the others skip this call); None decides on the device with a `lax.cond`."""
    if refresh:
        return select()
    return jax.lax.cond(step % sparsity.reuse_interval == 0, select, lambda: previous)
