"""The paged KV cache pytree (its writes are the paged_write op, through attention.py).

One pool of physical pages holds the keys and values of every (layer, KV head); a page holds
`page_size` tokens of one head. Each sequence has a page table per (layer, KV head) that maps
logical page j (tokens j*N_P .. j*N_P + N_P - 1) to a physical page. A streaming head keeps only
its sink pages and a ring of local pages (its table aliases the ring), so its memory stays
constant as the sequence grows; physical page 0 is the trash page. The layout is defined once,
in `pallas_kernels.layout`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lserve_jax.config import ModelConfig, SparsityConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Paged KV cache plus the decode-time page-selection state (all arrays; no static fields)."""

    k: jax.Array  # [P, Np, H] kv dtype: key pages of every (layer, KV head); page 0 is trash
    v: jax.Array  # [P, Np, H] kv dtype: value pages
    kmin: jax.Array  # [P, Np/Nl, H] kv dtype: channel-wise min of post-RoPE keys per logical
    #                  page ([1, Np/Nl, H] and unused when the policy selects no pages)
    kmax: jax.Array  # [P, Np/Nl, H] kv dtype: channel-wise max
    page_table: jax.Array  # [B, L, K, M] int32: logical page -> physical page (0 = unallocated)
    lengths: jax.Array  # [B] int32: tokens held per sequence
    selected: jax.Array  # [L, B, K, Gs, W] int32: reusable page selection (logical ids, -1 pad)

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[-1]


def selection_shape(model: ModelConfig, sparsity: SparsityConfig, batch: int) -> tuple:
    """[L, B, K, Gs, W]: Gs = G lists per KV head when selecting per query head, else 1; W
    slots for the K - 1 pages chosen besides the current one (unused when the policy selects
    nothing)."""
    per_query = sparsity.dynamic and sparsity.selection_granularity == "query_head"
    groups = model.group_size if per_query else 1
    return (model.n_layers, batch, model.n_kv_heads, groups, sparsity.selection_width)


def empty_cache(model: ModelConfig, sparsity: SparsityConfig, *, num_pages: int, batch: int,
                max_pages: int, fill: float = 0.0) -> KVCache:
    """A cache of `num_pages` physical pages, every value `fill` (tests poison with NaN)."""
    dtype = jnp.dtype(model.dtype)
    n_p, n_l, h = sparsity.page_size, sparsity.logical_page_size, model.head_dim
    pool = jnp.full((num_pages, n_p, h), fill, dtype)
    stats = jnp.full((num_pages if sparsity.dynamic else 1, n_p // n_l, h), fill, dtype)
    return KVCache(
        k=pool, v=pool.copy(), kmin=stats, kmax=stats.copy(),
        page_table=jnp.zeros((batch, model.n_layers, model.n_kv_heads, max_pages), jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        selected=jnp.full(selection_shape(model, sparsity, batch), -1, jnp.int32))


def gather_layer(cache: KVCache, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Contiguous [B, M*Np, K, H] keys and values of one layer (for dense reference/cuDNN paths)."""
    table = cache.page_table[:, layer]  # [B, K, M]
    b, kh, m = table.shape

    def gather(pool):
        pages = pool[table]  # [B, K, M, Np, H]
        return pages.reshape(b, kh, m * pool.shape[1], -1).transpose(0, 2, 1, 3)

    return gather(cache.k), gather(cache.v)
