"""Test helpers: caches with allocated page tables, poisoned with NaN; a per-query reference of
LServe's page selection."""

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
    np.random.default_rng(seed).shuffle(allocator._free[0])  # scatter pages across the pool
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


def allowed_keys(q, k, page, logical, budget):
    """[B, N, T, T] bool, one query at a time: own page + the budget - 1 earlier pages with the
    best Quest bound (all earlier pages when there are fewer), keys j <= i."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    mask = np.zeros((b, n, t, t), bool)
    for bi in range(b):
        for head in range(n):
            keys = k[bi, :, head // g]
            for i in range(t):
                cur = i // page
                scores = []
                for p in range(cur):
                    bounds = [np.sum(np.maximum(q[bi, i, head] * keys[s:s + logical].min(0),
                                                q[bi, i, head] * keys[s:s + logical].max(0)))
                              for s in range(p * page, (p + 1) * page, logical)]
                    scores.append(max(bounds))
                pages = set(np.argsort(scores)[::-1][:budget - 1].tolist()) | {cur}
                mask[bi, head, i, : i + 1] = [j // page in pages for j in range(i + 1)]
    return mask
