"""Plain-jnp reference for unified sparse paged decode attention (one query token per sequence).

Every head attends to the pages in its own list: a streaming head to its sink + local pages, a
retrieval head to its selected pages or to all pages. Masks are token-exact: a streaming head
sees positions p < sink or p >= t - local (t = the current token's position, the last one held);
every head sees only p <= t. Computed in f32 at highest precision; rounds once, to q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decode_visible(pos: jax.Array, lengths: jax.Array, streaming: jax.Array, *, sink: int,
                   local: int) -> jax.Array:
    """Which key positions a decode query sees. pos: [B, K, ...] key positions; lengths: [B];
    streaming: [K] bool. Returns a bool array shaped like pos."""
    extra = (1,) * (pos.ndim - 2)
    t = (lengths - 1).reshape((-1, 1) + extra)  # the current token's position
    window = (pos < sink) | (pos >= t - local)
    return (pos <= t) & (~streaming.reshape((1, -1) + extra) | window)


def sparse_decode_reference(
    q: jax.Array,  # [B, K, G, H]
    k_pool: jax.Array,  # [P, Np, H]
    v_pool: jax.Array,  # [P, Np, H]
    table: jax.Array,  # [B, K, M] int32: logical -> physical page of this layer
    pages: jax.Array,  # [B, K, Gs, S] int32: logical pages each head attends to (Gs divides G)
    counts: jax.Array,  # [B, K, Gs] int32: entries of `pages` in use
    lengths: jax.Array,  # [B] int32: tokens held, the current one included
    streaming: jax.Array,  # [K] bool
    shared_lists: jax.Array | None = None,  # [K] bool: a speed hint for kernels; no effect here
    *,
    sink: int,
    local: int,
    scale: float | None = None,
) -> jax.Array:
    """Returns [B, K, G, H] in q's dtype; a head that sees no key returns zeros."""
    del shared_lists
    b, kh, g, h = q.shape
    gs, s = pages.shape[2], pages.shape[3]
    n_p = k_pool.shape[1]
    scale = h ** -0.5 if scale is None else scale
    used = jnp.arange(s) < counts[..., None]  # [B, K, Gs, S]
    logical = jnp.where(used, pages, 0)
    phys = jnp.take_along_axis(table[:, :, None, :], logical, axis=-1)  # [B, K, Gs, S]
    keys = k_pool[phys].reshape(b, kh, gs, s * n_p, h).astype(jnp.float32)
    values = v_pool[phys].reshape(b, kh, gs, s * n_p, h).astype(jnp.float32)
    pos = (logical[..., None] * n_p + jnp.arange(n_p)).reshape(b, kh, gs, s * n_p)
    visible = jnp.repeat(used, n_p, axis=-1) & decode_visible(
        pos, lengths, streaming, sink=sink, local=local)
    values = jnp.where(visible[..., None], values, 0.0)
    qg = q.reshape(b, kh, gs, g // gs, h).astype(jnp.float32)
    logits = jnp.einsum("bkgqh,bkgsh->bkgqs", qg, keys, precision="highest") * scale
    logits = jnp.where(visible[:, :, :, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    out = jnp.einsum("bkgqs,bkgsh->bkgqh", p, values, precision="highest")
    out = out / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    return out.reshape(b, kh, g, h).astype(q.dtype)
