"""The paged KV cache pytree (its writes are the paged_write op, through attention.py).

One pool of physical pages holds the keys and values of every (layer, KV head); a page holds
`page_size` tokens of one head. Each sequence has a page table per (layer, KV head) that maps
logical page j (tokens j*N_P .. j*N_P + N_P - 1) to a physical page. A streaming head keeps only
its sink pages and a ring of local pages (its table aliases the ring), so its memory stays
constant as the sequence grows; physical page 0 is the trash page. The layout is defined once,
in `pallas_kernels.layout`; quantized pages (`CacheConfig.kv_dtype`) in `pallas_kernels.kv_quant`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.parallel import DP, PAGES, TP
from pallas_kernels.kv_quant import STATIC, QuantizedPool, empty_pool, pool_kind, read_pages
from pallas_kernels.layout import TRASH_PAGE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Paged KV cache plus the decode-time page-selection state: arrays, and a quantized pool's
    format as static pytree metadata (`QuantizedPool.kind`)."""

    k: jax.Array | QuantizedPool  # [P, Np, H]: key pages of every (layer, KV head), in the
    #                                model's dtype or quantized (`kv_quant`); page 0 is trash
    v: jax.Array | QuantizedPool  # [P, Np, H]: value pages
    kmin: jax.Array  # [P, Np/Nl, H] model dtype: channel-wise min of post-RoPE keys per logical
    #                  page ([1, Np/Nl, H] and unused when the policy selects no pages)
    kmax: jax.Array  # [P, Np/Nl, H] model dtype: channel-wise max
    page_table: jax.Array  # [B, L, K, M] int32: logical page -> physical page (0 = unallocated)
    lengths: jax.Array  # [B] int32: tokens held per sequence
    selected: jax.Array  # [L, B, K, Gs, W] int32: reusable page selection (logical ids, -1 pad)

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[-1]

    def rows(self, slots: jax.Array) -> KVCache:
        """The cache seen through rows `slots` [P] (a slot >= B reads as an empty row): the
        pools are shared, the per-row state gathered."""
        def pick(x, axis, fill):
            return jnp.take(x, slots, axis=axis, mode="fill", fill_value=fill)

        return dataclasses.replace(
            self, k=_row_scales(self.k, lambda s: pick(s, 1, 1.0)),
            v=_row_scales(self.v, lambda s: pick(s, 1, 1.0)),
            page_table=pick(self.page_table, 0, TRASH_PAGE), lengths=pick(self.lengths, 0, 0),
            selected=pick(self.selected, 1, -1))

    def merge_rows(self, slots: jax.Array, view: KVCache) -> KVCache:
        """This cache after `view = self.rows(slots)` was written (padding slots dropped)."""
        def put(mine, seen):  # the written codes, this cache's row scales updated
            return _row_scales(seen, lambda s: mine.scale.at[:, slots].set(s, mode="drop"))

        return dataclasses.replace(self, k=put(self.k, view.k), v=put(self.v, view.v),
                                   kmin=view.kmin, kmax=view.kmax,
                                   lengths=self.lengths.at[slots].set(view.lengths, mode="drop"))


def _row_scales(pool, fn):
    """`pool` with fn applied to its per-row scales ([L, B, K], static formats); other pools
    as they are (their codes are shared by every row)."""
    if pool_kind(pool) not in STATIC:
        return pool
    return dataclasses.replace(pool, scale=fn(pool.scale))


def selection_shape(model: ModelConfig, sparsity: SparsityConfig, batch: int) -> tuple:
    """[L, B, K, Gs, W]: Gs = G lists per KV head when selecting per query head, else 1; W
    slots for the K - 1 pages chosen besides the current one (unused when the policy selects
    nothing)."""
    per_query = sparsity.dynamic and sparsity.selection_granularity == "query_head"
    groups = model.group_size if per_query else 1
    return (model.n_layers, batch, model.n_kv_heads, groups, sparsity.selection_width)


def empty_cache(model: ModelConfig, sparsity: SparsityConfig, *, num_pages: int, batch: int,
                max_pages: int, fill: float = 0.0, kv_dtype: str = "auto",
                shards: int = 1) -> KVCache:
    """A cache of `num_pages` physical pages, every value `fill` (tests poison with NaN),
    its pages in `kv_dtype` ('auto': the model's dtype; else a `kv_quant` format). `shards`:
    the devices its pool is split over (`cache_specs`)."""
    dtype = jnp.dtype(model.dtype)
    n_p, n_l, h = sparsity.page_size, sparsity.logical_page_size, model.head_dim

    def pool():
        return empty_pool(kv_dtype, num_pages, n_p, h, n_layers=model.n_layers, batch=batch,
                          n_kv=model.n_kv_heads, dtype=dtype, fill=fill)

    stats = jnp.full((num_pages if sparsity.dynamic else shards, n_p // n_l, h), fill, dtype)
    return KVCache(
        k=pool(), v=pool(), kmin=stats, kmax=stats.copy(),
        page_table=jnp.zeros((batch, model.n_layers, model.n_kv_heads, max_pages), jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        selected=jnp.full(selection_shape(model, sparsity, batch), -1, jnp.int32))


def cache_specs(cache: KVCache) -> KVCache:
    """The cache's `PartitionSpec`s over a ('dp', 'tp') mesh (`lserve_jax.parallel`): pools
    and statistics by device blocks of pages, per-row state by slot over dp and by KV head over
    tp."""
    def pool(x):
        if not isinstance(x, QuantizedPool):
            return PAGES
        scale = P(None, DP, TP) if x.kind in STATIC else PAGES
        return dataclasses.replace(x, codes=PAGES, scale=scale)

    return KVCache(k=pool(cache.k), v=pool(cache.v), kmin=PAGES, kmax=PAGES,
                   page_table=P(DP, None, TP), lengths=P(DP), selected=P(None, DP, TP))


def gather_layer(cache: KVCache, layer: int) -> tuple[jax.Array, jax.Array]:
    """Contiguous [B, M*Np, K, H] keys and values of one layer in the model's dtype,
    dequantized (for dense reference/cuDNN paths and later prefill chunks)."""
    table = cache.page_table[:, layer]  # [B, K, M]
    b, kh, m = table.shape

    def gather(pool):
        if isinstance(pool, QuantizedPool):
            pages = read_pages(pool, table, layer).astype(cache.kmin.dtype)
        else:
            pages = pool[table]  # [B, K, M, Np, H]
        return pages.reshape(b, kh, m * pool.shape[1], -1).transpose(0, 2, 1, 3)

    return gather(cache.k), gather(cache.v)
