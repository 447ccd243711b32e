"""Public entry of the unified sparse paged decode op (same call as the reference)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._compat import next_power_of_two
from pallas_kernels.sparse_decode.kernel import DecodeBlocks, decode_partials


def _check(q, k_pool, v_pool, table, pages, counts, lengths, streaming):
    b, kh, g, h = q.shape
    gs = pages.shape[2]
    if k_pool.shape != v_pool.shape or k_pool.ndim != 3 or k_pool.shape[2] != h:
        raise ValueError(f"k_pool {k_pool.shape} and v_pool {v_pool.shape} must both be "
                         f"[P, page_size, {h}]")
    expected = {"table": (table.shape[:2], (b, kh)), "pages": (pages.shape[:2], (b, kh)),
                "counts": (counts.shape, (b, kh, gs)), "lengths": (lengths.shape, (b,)),
                "streaming": (streaming.shape, (kh,))}
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"{name} has shape {tuple(got)}, expected {want} for q {q.shape}")
    if g % gs:
        raise ValueError(f"pages has {gs} lists per KV head; it must divide G={g}")


@functools.partial(jax.jit, static_argnames=("sink", "local", "scale", "blocks", "interpret"))
def sparse_decode(
    q: jax.Array,  # [B, K, G, H]
    k_pool: jax.Array,  # [P, Np, H]
    v_pool: jax.Array,  # [P, Np, H]
    table: jax.Array,  # [B, K, M] int32 logical -> physical page (this layer)
    pages: jax.Array,  # [B, K, Gs, S] int32 logical pages per list (list gs serves G/Gs heads)
    counts: jax.Array,  # [B, K, Gs] int32 entries in use
    lengths: jax.Array,  # [B] int32 tokens held, the current one included
    streaming: jax.Array,  # [K] bool
    shared_lists: jax.Array | None = None,  # [K] bool: every list of the head is the same
    *,
    sink: int,
    local: int,
    scale: float | None = None,
    blocks: DecodeBlocks | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same result as `sparse_decode_reference`; returns [B, K, G, H] in q's dtype.

    `shared_lists` marks heads whose Gs lists are identical (streaming and dense heads under
    per-query-head selection): their pages are then read once, by list 0, for all G heads.
    """
    _check(q, k_pool, v_pool, table, pages, counts, lengths, streaming)
    b, kh, g, h = q.shape
    gs, s = pages.shape[2], pages.shape[3]
    m = table.shape[2]
    blocks = blocks or DecodeBlocks.for_shape(k_pool.shape[1], s, b * kh * gs)
    width = -(-s // blocks.pages_per_split) * blocks.pages_per_split
    used = jnp.arange(width) < counts[..., None]
    logical = jnp.pad(pages, ((0, 0),) * 3 + ((0, width - s),))
    logical = jnp.where(used, jnp.clip(logical, 0, m - 1), 0)  # every gather stays in bounds
    phys = jnp.where(used, jnp.take_along_axis(table[:, :, None, :], logical, axis=-1), 0)
    list_of_row = jnp.broadcast_to(jnp.arange(g) // (g // gs), (kh, g))
    if shared_lists is not None:
        counts = jnp.where(shared_lists[None, :, None] & (jnp.arange(gs) > 0), 0, counts)
        list_of_row = jnp.where(shared_lists[:, None], 0, list_of_row)
    gp = max(16, next_power_of_two(g))  # Triton dots need >= 16 rows
    q_rows = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    o, mx, l = decode_partials(
        q_rows, k_pool, v_pool, phys.astype(jnp.int32), logical.astype(jnp.int32),
        counts.astype(jnp.int32), lengths.astype(jnp.int32), streaming.astype(jnp.int32),
        scale=h ** -0.5 if scale is None else scale, sink=sink, local=local, blocks=blocks,
        interpret=interpret)
    # pick, for query head g, the partials of the list that serves it: [B, K, G, splits(, H)]
    pick = list_of_row[None, :, :, None]
    mx = jnp.take_along_axis(mx[..., :g].transpose(0, 1, 4, 2, 3), pick[..., None], axis=3)[..., 0, :]
    l = jnp.take_along_axis(l[..., :g].transpose(0, 1, 4, 2, 3), pick[..., None], axis=3)[..., 0, :]
    o = jnp.take_along_axis(o[..., :g, :].transpose(0, 1, 4, 2, 3, 5), pick[..., None, None],
                            axis=3)[..., 0, :, :]
    top = jnp.max(mx, axis=-1, keepdims=True)
    w = jnp.exp2(mx - top)  # [B, K, G, splits]
    total = jnp.sum(w * l, axis=-1)
    out = jnp.sum(w[..., None] * o, axis=-2) / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(q.dtype)
