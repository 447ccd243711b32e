"""Plain-jnp reference for writing tokens into the paged KV pool with page statistics.

Layout (shared by every op): pools `[P, Np, H]` hold one (layer, KV head)'s `Np` tokens per
physical page; statistics `[P, Np/Nl, H]` hold the channel-wise min/max of each logical page of
`Nl` tokens; page 0 is the trash page: a token that must not land is routed there (the decode
kernel writes it there; the multi-token scatters below skip it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TRASH_PAGE = 0


def destinations(table, lengths, new_lens, streaming, t: int, n_p: int, *, sink_pages: int,
                 ring_pages: int) -> tuple[jax.Array, jax.Array]:
    """Where each new token lands: (physical page [B, T, K], slot in the page [B, T, 1]).

    Token t of row b sits at position lengths[b] + t and is written iff t < new_lens[b]; a
    streaming head's token lands only if its page is a sink page or one of the last
    `ring_pages` pages after this write (the ring would overwrite the rest). The rest go to
    the trash page.
    """
    positions = lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    logical = positions // n_p
    last_page = (lengths + new_lens - 1) // n_p  # [B]
    valid = jnp.arange(t)[None, :] < new_lens[:, None]  # [B, T]
    in_ring = (logical < sink_pages) | (logical > last_page[:, None] - ring_pages)
    keep = valid[..., None] & (~streaming[None, None, :] | in_ring[..., None])  # [B, T, K]
    logical = jnp.minimum(logical, table.shape[-1] - 1)
    phys = jnp.take_along_axis(table[:, None], logical[:, :, None, None], axis=-1)[..., 0]
    return jnp.where(keep, phys, TRASH_PAGE), (positions % n_p)[..., None]


def write_tokens_reference(
    k_pool: jax.Array,  # [P, Np, H]
    v_pool: jax.Array,  # [P, Np, H]
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
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Writes tokens at positions lengths[b] + t (see `destinations`); returns the updated
    (k_pool, v_pool, kmin, kmax). Statistics (when `stats`) are exact: a logical page restarts
    from +inf/-inf at its first token, then takes the min/max of every key written to it.
    Values are cast to the pool dtype (the only rounding); min/max of rounded keys are exact.
    """
    phys, slot = destinations(table, lengths, new_lens, streaming, k.shape[1], k_pool.shape[1],
                              sink_pages=sink_pages, ring_pages=ring_pages)
    phys = dropped(phys, k_pool.shape[0])
    n_l = k_pool.shape[1] // kmin.shape[1]  # kmin keeps its [*, Np/Nl, H] shape without stats
    stat = slot // n_l
    k = k.astype(k_pool.dtype)
    if stats:
        starts = jnp.where(slot % n_l == 0, phys, k_pool.shape[0])
        kmin = kmin.at[starts, stat].set(jnp.inf, mode="drop").at[phys, stat].min(k, mode="drop")
        kmax = kmax.at[starts, stat].set(-jnp.inf, mode="drop").at[phys, stat].max(k, mode="drop")
    k_pool = k_pool.at[phys, slot].set(k, mode="drop")
    v_pool = v_pool.at[phys, slot].set(v.astype(v_pool.dtype), mode="drop")
    return k_pool, v_pool, kmin, kmax


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in HF's convention (channel pairs (i, i + H/2)) computed in f32 and rounded once
    to x's dtype. x: [..., M, H]; cos, sin: [..., H/2] f32, broadcast over the heads M."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def append_rotated_reference(k_pool, v_pool, kmin, kmax, table, lengths,
                             qkv: jax.Array,  # [B, N + 2K, H] one new token per row
                             cos: jax.Array,  # [B, H/2] f32 rotation of the token's position
                             sin: jax.Array,  # [B, H/2] f32
                             new_lens, streaming, *, q_rows: int, sink_pages: int,
                             ring_pages: int, stats: bool = True):
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
                                   sink_pages=sink_pages, ring_pages=ring_pages, stats=stats)
    q = q.reshape(b, kh, n // kh, h)
    return (jnp.pad(q, ((0, 0), (0, 0), (0, q_rows - n // kh), (0, 0))), *pools)


def dropped(phys: jax.Array, num_pages: int) -> jax.Array:
    """Trash-page destinations made out of range, for scatters with mode="drop": the update is
    skipped instead of landing (a prefill sends most streaming-head tokens to the trash page,
    and thousands of updates colliding on one page serialise on the GPU)."""
    return jnp.where(phys == TRASH_PAGE, num_pages, phys)
