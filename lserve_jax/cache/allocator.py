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


def pages_per_device(n_tokens: int, streaming: np.ndarray, sparsity: SparsityConfig,
                     tp: int = 1) -> np.ndarray:
    """[tp] pages a sequence of `n_tokens` needs on each of the tp devices splitting its KV
    heads (device t holds heads [t K/tp, (t + 1) K/tp))."""
    counts = pages_per_head(n_tokens, streaming, sparsity)
    return counts.reshape(counts.shape[0], tp, -1).sum(axis=(0, 2))


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
    """Free lists over physical pages: one per shard of the pool (a device's block of pages on
    a mesh, `lserve_jax.parallel`; one shard on one device). A shard's pages have local ids
    1 .. num_pages / shards - 1; its page 0 is its trash page."""

    def __init__(self, num_pages: int, shards: int = 1):
        per_shard = num_pages // shards
        if num_pages % shards or per_shard < 2:
            raise ValueError(f"num_pages={num_pages} over {shards} device(s) is too small or "
                             "uneven: each device needs its trash page plus at least one page, "
                             "and the same number of pages")
        self.num_pages = num_pages
        self.shard_capacity = per_shard - 1  # pages a sequence can hold on one device
        self._free = [list(range(per_shard - 1, TRASH_PAGE, -1)) for _ in range(shards)]

    @property
    def shards(self) -> int:
        return len(self._free)

    @property
    def free(self) -> int:
        return sum(self.free_in(s) for s in range(self.shards))

    def free_in(self, shard: int) -> int:
        return len(self._free[shard])

    @property
    def capacity(self) -> int:
        """Pages sequences can hold: all but the trash pages."""
        return self.shards * self.shard_capacity

    @property
    def held(self) -> int:
        return self.capacity - self.free

    def check(self, n: int, shard: int = 0) -> None:
        """Raises PoolExhausted unless `shard` has `n` free pages."""
        if n > self.free_in(shard):
            where = f" on device {shard}" if self.shards > 1 else ""
            raise PoolExhausted(f"the page pool has {self.free_in(shard)} free pages{where} of "
                                f"{self.shard_capacity}, the request needs {n}: raise "
                                "CacheConfig.num_pages, or send fewer or shorter requests")

    def allocate(self, n: int, shard: int = 0) -> list[int]:
        self.check(n, shard)
        free = self._free[shard]
        pages = free[len(free) - n:]
        del free[len(free) - n:]
        return pages

    def release(self, pages: list[int], shard: int = 0) -> None:
        self._free[shard].extend(reversed(pages))


class SequencePages:
    """Reserves and releases the pages of sequences, and builds their page-table rows. On a
    mesh, (layer, KV head)'s pages come from the shard of the device holding that head in
    the sequence's replica: shard r * tp + k // (K / tp)."""

    def __init__(self, allocator: PageAllocator, streaming: np.ndarray, sparsity: SparsityConfig,
                 max_pages: int, tp: int = 1):
        self.allocator = allocator
        self.streaming = np.asarray(streaming, bool)  # [L, K]
        self.sparsity = sparsity
        self.max_pages = max_pages
        self.tp = tp
        self.replicas = allocator.shards // tp

    def per_device(self, n_tokens: int) -> np.ndarray:
        """[tp] pages a sequence of `n_tokens` needs on each device of its replica."""
        return pages_per_device(n_tokens, self.streaming, self.sparsity, self.tp)

    def fits(self, n_tokens: int, replica: int = 0) -> bool:
        """Whether `replica`'s free pages hold a sequence of `n_tokens` now."""
        need = self.per_device(n_tokens)
        return all(need[t] <= self.allocator.free_in(replica * self.tp + t)
                   for t in range(self.tp))

    def reserve(self, n_tokens: int, replica: int = 0) -> tuple[np.ndarray, dict[int, list]]:
        """(page-table row [L, K, M] int32, the pages to release later by shard). Raises
        PoolExhausted (and takes nothing) when the replica's devices cannot hold it."""
        needed = math.ceil(n_tokens / self.sparsity.page_size)
        if needed > self.max_pages:
            raise ValueError(f"a sequence of {n_tokens} tokens needs {needed} pages but the page "
                             f"table holds {self.max_pages}: raise CacheConfig.max_seq_len")
        need = self.per_device(n_tokens)
        shards = [replica * self.tp + t for t in range(self.tp)]
        for t, shard in enumerate(shards):
            self.allocator.check(int(need[t]), shard)
        pages = {s: self.allocator.allocate(int(need[t]), s) for t, s in enumerate(shards)}
        counts = pages_per_head(n_tokens, self.streaming, self.sparsity)
        row = np.full(self.streaming.shape + (self.max_pages,), TRASH_PAGE, np.int32)
        heads = self.streaming.shape[1] // self.tp
        cursor = [0] * self.tp
        for (layer, head), count in np.ndenumerate(counts):
            t = head // heads
            own = np.asarray(pages[shards[t]][cursor[t]:cursor[t] + count], np.int32)
            cursor[t] += count
            slots = ring_slots(needed, bool(self.streaming[layer, head]),
                               self.sparsity.sink_pages, self.sparsity.ring_pages)
            row[layer, head, :needed] = own[slots]
        return row, pages

    def release(self, pages: dict[int, list]) -> None:
        for shard, ids in pages.items():
            self.allocator.release(ids, shard)
