"""Plain-jnp reference for writing tokens into the paged KV pool with page statistics.

The layout (pools, statistics, the trash page, the streaming ring) is `pallas_kernels.layout`'s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant
from pallas_kernels.layout import destinations, dropped, rotate


def write_tokens_reference(
    k_pool,  # [P, Np, H] array or kv_quant.QuantizedPool
    v_pool,  # [P, Np, H] array or kv_quant.QuantizedPool
    kmin: jax.Array,  # [P, Np/Nl, H]
    kmax: jax.Array,  # [P, Np/Nl, H]
    table: jax.Array,  # [B, K, M] int32: this layer's logical -> physical page map
    lengths: jax.Array,  # [B] int32: tokens held before this write
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    new_lens: jax.Array,  # [B] int32: row b writes its first new_lens[b] tokens
    streaming: jax.Array,  # [K] bool: heads whose table aliases a ring of pages
    *,
    sink_pages: int,
    ring_pages: int,
    stats: bool = True,
    layer: int = 0,
    head_axis: str | None = None,
) -> tuple:
    """Writes tokens at positions lengths[b] + t (see `destinations`); returns the updated
    (k_pool, v_pool, kmin, kmax). Statistics (when `stats`) are exact: a logical page restarts
    from +inf/-inf at its first token, then takes the min/max of every key written to it.
    Values are cast to the pool dtype (the only rounding); min/max of rounded keys are exact.
    A quantized pool quantizes on write (a static format first calibrates the rows that start
    here; `layer` picks its scales; `head_axis`: the mesh axis the KV heads are split over,
    for int8's one scale across them); statistics come from the unquantized keys.
    """
    phys, slot = destinations(table, lengths, new_lens, streaming, k.shape[1], k_pool.shape[1],
                              sink_pages=sink_pages, ring_pages=ring_pages)
    phys = dropped(phys, k_pool.shape[0])
    n_l = k_pool.shape[1] // kmin.shape[1]  # kmin keeps its [*, Np/Nl, H] shape without stats
    stat = slot // n_l
    k_pool, v_pool = (_calibrated(pool, x, lengths, new_lens, layer, head_axis)
                      for pool, x in ((k_pool, k), (v_pool, v)))
    k = k.astype(kmin.dtype if isinstance(k_pool, kv_quant.QuantizedPool) else k_pool.dtype)
    if stats:
        starts = jnp.where(slot % n_l == 0, phys, k_pool.shape[0])
        kmin = kmin.at[starts, stat].set(jnp.inf, mode="drop").at[phys, stat].min(k, mode="drop")
        kmax = kmax.at[starts, stat].set(-jnp.inf, mode="drop").at[phys, stat].max(k, mode="drop")
    return (kv_quant.store(k_pool, phys, slot, k, layer),
            kv_quant.store(v_pool, phys, slot, v, layer), kmin, kmax)


def _calibrated(pool, x, lengths, new_lens, layer, head_axis):
    """A static format's pool with the starting rows' scales of `layer` set from x."""
    if kv_quant.pool_kind(pool) not in kv_quant.STATIC:
        return pool
    scale = kv_quant.calibrate(pool.scale[layer], pool.kind, x, lengths, new_lens, head_axis)
    return dataclasses.replace(pool, scale=pool.scale.at[layer].set(scale))


def append_rotated_reference(k_pool, v_pool, kmin, kmax, table, lengths,
                             qkv: jax.Array,  # [B, N + 2K, H] one new token per row
                             cos: jax.Array,  # [B, H/2] f32 rotation of the token's position
                             sin: jax.Array,  # [B, H/2] f32
                             new_lens, streaming, *, q_rows: int, sink_pages: int,
                             ring_pages: int, stats: bool = True, layer: int = 0):
    """A decode step's write: rotates the token's query and key heads, appends the key and
    value like `write_tokens_reference` (the other arguments are its), and returns (q
    [B, K, q_rows, H] with each KV head's G rotated query heads then zero rows, k_pool,
    v_pool, kmin, kmax)."""
    b, _, h = qkv.shape
    kh = table.shape[1]
    n = qkv.shape[1] - 2 * kh
    q, k = rotate(qkv[:, :n], cos, sin), rotate(qkv[:, n:n + kh], cos, sin)
    pools = write_tokens_reference(k_pool, v_pool, kmin, kmax, table, lengths, k[:, None],
                                   qkv[:, None, n + kh:], new_lens, streaming,
                                   sink_pages=sink_pages, ring_pages=ring_pages, stats=stats,
                                   layer=layer)
    q = q.reshape(b, kh, n // kh, h)
    return (jnp.pad(q, ((0, 0), (0, 0), (0, q_rows - n // kh), (0, 0))), *pools)
