"""Test helpers: caches with allocated page tables, poisoned with NaN."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from lserve_jax.cache.allocator import PageAllocator, SequencePages, pages_per_head
from lserve_jax.cache.paged import KVCache, empty_cache
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.sparsity.policy import STREAM


def allocated_cache(cfg: ModelConfig, sparsity: SparsityConfig, capacities: list[int],
                    modes: np.ndarray, *, max_pages: int | None = None,
                    spare_pages: int = 7, fill: float = float("nan"), seed: int = 0
                    ) -> tuple[KVCache, list[list[int]]]:
    """A NaN-filled cache whose row b has pages reserved for capacities[b] tokens (0: none).
    Pages are handed out in a shuffled order so that physical order != logical order."""
    max_pages = max_pages or max(1, max(math.ceil(c / sparsity.page_size) for c in capacities))
    streaming = np.asarray(modes) == STREAM
    total = 1 + spare_pages + sum(int(pages_per_head(c, streaming, sparsity).sum())
                                  for c in capacities)
    allocator = PageAllocator(total)
    np.random.default_rng(seed).shuffle(allocator._free)  # scatter pages across the pool
    pages = SequencePages(allocator, streaming, sparsity, max_pages)
    table = np.zeros((len(capacities), cfg.n_layers, cfg.n_kv_heads, max_pages), np.int32)
    owned = []
    for row, capacity in enumerate(capacities):
        if capacity:
            table[row], got = pages.reserve(capacity)
            owned.append(got)
        else:
            owned.append([])
    cache = empty_cache(cfg, sparsity, num_pages=total, batch=len(capacities),
                        max_pages=max_pages, fill=fill)
    return dataclasses.replace(cache, page_table=jnp.asarray(table)), owned
