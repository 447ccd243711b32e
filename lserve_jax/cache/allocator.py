"""Host-side page allocation: a free list of physical pages and per-sequence page tables.

Plain Python and numpy; only the finished page tables cross into jit. A request reserves every
page it can ever need (prompt + max new tokens) when it is admitted, so the jitted decode loop
never allocates. Streaming heads reserve only sink + ring pages (their table aliases the ring).
"""

from __future__ import annotations

import math

import numpy as np

from lserve_jax.config import ModelConfig, SparsityConfig
from pallas_kernels.kv_quant import token_bytes
from pallas_kernels.layout import TRASH_PAGE, ring_slots


class PoolExhausted(RuntimeError):
    """The page pool cannot hold a request; the request is refused and nothing else changes."""


def pages_per_head(n_tokens: int, streaming: np.ndarray, sparsity: SparsityConfig) -> np.ndarray:
    """[L, K] physical pages each (layer, KV head) needs to hold `n_tokens` tokens."""
    dense = math.ceil(n_tokens / sparsity.page_size)
    return np.where(streaming, min(dense, sparsity.stream_pages), dense).astype(np.int64)


def page_bytes(model: ModelConfig, sparsity: SparsityConfig, kv_dtype: str = "auto") -> int:
    """Bytes of one physical page: its K and V in `kv_dtype` (with per-token scales where the
    format has them) and (for policies that select pages) its statistics."""
    stat_rows = sparsity.page_size // sparsity.logical_page_size if sparsity.dynamic else 0
    token = token_bytes(kv_dtype, model.head_dim, model.itemsize)
    return 2 * (sparsity.page_size * token + stat_rows * model.head_dim * model.itemsize)


def kv_bytes_per_token(model: ModelConfig, kv_dtype: str = "auto") -> int:
    """Dense K+V bytes per token of one sequence, all layers, in `kv_dtype` (statistics not
    counted)."""
    return 2 * model.n_layers * model.n_kv_heads * token_bytes(kv_dtype, model.head_dim,
                                                               model.itemsize)


def kv_bytes_per_sequence(n_tokens: int, streaming: np.ndarray, model: ModelConfig,
                          sparsity: SparsityConfig, kv_dtype: str = "auto") -> int:
    """Bytes one sequence of `n_tokens` occupies in the pool."""
    pages = int(pages_per_head(n_tokens, streaming, sparsity).sum())
    return pages * page_bytes(model, sparsity, kv_dtype)


class PageAllocator:
    """Free list over physical pages 1..num_pages-1 (page 0 is the trash page)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} is too small: the pool needs the trash page "
                             "plus at least one page")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, TRASH_PAGE, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages a sequence can hold: all but the trash page."""
        return self.num_pages - 1

    @property
    def held(self) -> int:
        return self.capacity - self.free

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"the page pool has {len(self._free)} free pages of "
                                f"{self.capacity}, the request needs {n}: raise "
                                "CacheConfig.num_pages, or send fewer or shorter requests")
        pages, self._free = self._free[-n:], self._free[:-n]
        return pages

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class SequencePages:
    """Reserves and releases the pages of sequences, and builds their page-table rows."""

    def __init__(self, allocator: PageAllocator, streaming: np.ndarray, sparsity: SparsityConfig,
                 max_pages: int):
        self.allocator = allocator
        self.streaming = np.asarray(streaming, bool)  # [L, K]
        self.sparsity = sparsity
        self.max_pages = max_pages

    def reserve(self, n_tokens: int) -> tuple[np.ndarray, list[int]]:
        """(page-table row [L, K, M] int32, pages to release later). Raises PoolExhausted."""
        needed = math.ceil(n_tokens / self.sparsity.page_size)
        if needed > self.max_pages:
            raise ValueError(f"a sequence of {n_tokens} tokens needs {needed} pages but the page "
                             f"table holds {self.max_pages}: raise CacheConfig.max_seq_len")
        counts = pages_per_head(n_tokens, self.streaming, self.sparsity)
        pages = self.allocator.allocate(int(counts.sum()))
        row = np.full(self.streaming.shape + (self.max_pages,), TRASH_PAGE, np.int32)
        cursor = 0
        for (layer, head), count in np.ndenumerate(counts):
            own = np.asarray(pages[cursor:cursor + count], np.int32)
            cursor += count
            slots = ring_slots(needed, bool(self.streaming[layer, head]),
                               self.sparsity.sink_pages, self.sparsity.ring_pages)
            row[layer, head, :needed] = own[slots]
        return row, pages

    def release(self, pages: list[int]) -> None:
        self.allocator.release(pages)
