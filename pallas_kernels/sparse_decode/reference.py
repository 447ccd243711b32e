"""Plain-jnp reference for unified sparse paged decode attention (one query token per row).

Which pages a head attends to is decided by its mode (data, [L, K] int):
- DENSE: every page the row holds.
- STREAM: the sink pages, then the pages overlapping the local window [t - local, t].
- SELECT: every page while the row holds at most `budget_pages` pages; otherwise the pages of
  its selection (`selected`, -1 padded) plus the current page, listed once: a selection that
  ends with the current page (an anchored selection, `page_select.reference.with_anchor`, at
  the step that made it) adds nothing.
Masks are token-exact: a streaming head sees positions p < sink or p >= t - local; every head
sees only p <= t (t = the current token's position, the last one held). Quantized pools
(`kv_quant`) are dequantized to f32 first. Computed in f32 at highest precision; rounds once, to
q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant, layout
from pallas_kernels.layout import SELECT, STREAM


def decode_page_lists(selected: jax.Array, lengths: jax.Array, modes: jax.Array, *,
                      width: int, page_size: int, local: int, sink_pages: int,
                      budget_pages: int) -> tuple[jax.Array, jax.Array]:
    """Page lists of one layer. selected: [B, K, Gs, W] int32 (-1 padded); lengths: [B];
    modes: [K]. Returns (logical pages [B, K, Gs, width], counts [B, K, Gs])."""
    b, kh, gs, _ = selected.shape
    n_pages = (lengths + page_size - 1) // page_size  # [B]
    i = jnp.arange(width)
    # STREAM: sink pages, then the window's pages
    sink = jnp.minimum(sink_pages, n_pages)
    first = jnp.clip((lengths - 1 - local) // page_size, sink_pages, n_pages)
    s_pages = jnp.where(i < sink[:, None], i, first[:, None] + i - sink[:, None])  # [B, S]
    s_count = sink + n_pages - first
    # SELECT beyond the budget: the selection, then the current page unless it ends the list
    n_sel = jnp.sum(selected >= 0, axis=-1)  # [B, K, Gs]
    last = jnp.take_along_axis(selected, jnp.maximum(n_sel - 1, 0)[..., None], axis=-1)[..., 0]
    n_sel = jnp.where((n_sel > 0) & (last == (n_pages - 1)[:, None, None]), n_sel - 1, n_sel)
    picked = jnp.pad(selected, ((0, 0),) * 3 + ((0, max(0, width - selected.shape[-1])),))
    sel_pages = jnp.where(i < n_sel[..., None], picked[..., :width],
                          (n_pages - 1)[:, None, None, None])
    sparse = ((modes == SELECT)[None, :] & (n_pages > budget_pages)[:, None])[..., None]
    stream = (modes == STREAM)[None, :, None]
    pages = jnp.where(sparse[..., None], sel_pages,
                      jnp.where(stream[..., None], s_pages[:, None, None], i))
    counts = jnp.where(sparse, n_sel + 1,
                       jnp.where(stream, s_count[:, None, None], n_pages[:, None, None]))
    return pages.astype(jnp.int32), jnp.broadcast_to(counts, (b, kh, gs)).astype(jnp.int32)


def decode_visible(pos: jax.Array, lengths: jax.Array, streaming: jax.Array, *, sink: int,
                   local: int) -> jax.Array:
    """Which key positions a decode query sees. pos: [B, K, ...]; lengths: [B];
    streaming: [K] bool. Returns a bool array shaped like pos."""
    extra = (1,) * (pos.ndim - 2)
    t = (lengths - 1).reshape((-1, 1) + extra)  # the current token's position
    window = (pos < sink) | (pos >= t - local)
    return (pos <= t) & (~streaming.reshape((1, -1) + extra) | window)


def sparse_decode_reference(
    q: jax.Array,  # [B, K, G, H]
    k_pool,  # [P, Np, H] array or kv_quant.QuantizedPool
    v_pool,  # [P, Np, H] array or kv_quant.QuantizedPool
    table: jax.Array,  # [B, L, K, M] int32 logical -> physical page
    selected: jax.Array,  # [L, B, K, Gs, W] int32 selected logical pages (-1 padded)
    lengths: jax.Array,  # [B] int32 tokens held, the current one included
    modes: jax.Array,  # [L, K] int DENSE / SELECT / STREAM
    *,
    layer: int,
    sink: int,
    local: int,
    budget_pages: int,
    scale: float | None = None,
    max_listed: int | None = None,
) -> jax.Array:
    """Returns [B, K, G, H] in q's dtype; a head that sees no key returns zeros. Selection list
    gs serves query heads gs * G/Gs .. (gs + 1) * G/Gs - 1. `max_listed` is a sizing hint
    for kernels and changes nothing here."""
    del max_listed
    b, kh, g, h = q.shape
    n_p = k_pool.shape[1]
    table, selected, modes = table[:, layer], selected[layer], modes[layer]
    gs, m = selected.shape[2], table.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    pages, counts = decode_page_lists(selected, lengths, modes, width=m, page_size=n_p,
                                      local=local, sink_pages=layout.sink_pages(sink, n_p),
                                      budget_pages=budget_pages)
    used = jnp.arange(m) < counts[..., None]  # [B, K, Gs, M]
    logical = jnp.where(used, jnp.clip(pages, 0, m - 1), 0)
    phys = jnp.take_along_axis(table[:, :, None, :], logical, axis=-1)
    keys = kv_quant.read_pages(k_pool, phys, layer).reshape(b, kh, gs, m * n_p, h)
    values = kv_quant.read_pages(v_pool, phys, layer).reshape(b, kh, gs, m * n_p, h)
    pos = (logical[..., None] * n_p + jnp.arange(n_p)).reshape(b, kh, gs, m * n_p)
    visible = jnp.repeat(used, n_p, axis=-1) & decode_visible(
        pos, lengths, modes == STREAM, sink=sink, local=local)
    values = jnp.where(visible[..., None], values, 0.0)
    qg = q.reshape(b, kh, gs, g // gs, h).astype(jnp.float32)
    logits = jnp.einsum("bkgqh,bkgsh->bkgqs", qg, keys, precision="highest") * scale
    logits = jnp.where(visible[:, :, :, None, :], logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0.0))
    out = jnp.einsum("bkgqs,bkgsh->bkgqh", p, values, precision="highest")
    out = out / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    return out.reshape(b, kh, g, h).astype(q.dtype)
