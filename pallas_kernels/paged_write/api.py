"""Public entry of the paged write: decode appends (fused with RoPE) go through the Pallas
kernel, multi-token writes (prefill) through XLA scatters. Same calls and results as the
references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._compat import layer_operand
from pallas_kernels.paged_write.kernel import append_rotated
from pallas_kernels.layout import destinations, dropped
from pallas_kernels.paged_write.reference import write_tokens_reference


@functools.partial(jax.jit, static_argnames=("q_rows", "sink_pages", "ring_pages", "stats",
                                             "layer", "interpret"))
def append_decode(k_pool, v_pool, kmin, kmax, table, lengths, qkv, cos, sin, new_lens,
                  streaming, *, q_rows: int, sink_pages: int, ring_pages: int,
                  stats: bool = True, layer: int = 0, interpret: bool = False):
    """See `append_rotated_reference` (argument shapes there): one kernel rotates the queries
    and the key, appends key and value and updates the page statistics."""
    b, m, h = qkv.shape
    kh = table.shape[1]
    n = m - 2 * kh
    if n % kh or cos.shape != (b, h // 2) or sin.shape != cos.shape:
        raise ValueError(f"qkv {qkv.shape} must be [B, N + 2K, H] with K={kh} dividing N, and "
                         f"cos {cos.shape} / sin {sin.shape} [B, H/2] = {(b, h // 2)}")
    if q_rows < n // kh:
        raise ValueError(f"q_rows={q_rows} must hold the G={n // kh} query heads")
    phys, slot = destinations(table, lengths, new_lens, streaming, 1, k_pool.shape[1],
                              sink_pages=sink_pages, ring_pages=ring_pages)
    return append_rotated(qkv, cos, sin, phys[:, 0], slot[:, 0, 0], k_pool, v_pool, kmin, kmax,
                          layer_operand(layer), q_rows=q_rows,
                          logical_page=k_pool.shape[1] // kmin.shape[1], stats=stats,
                          interpret=interpret)


@functools.partial(jax.jit, static_argnames=("sink_pages", "ring_pages", "stats", "aligned",
                                             "layer", "head_axis"))
def write_tokens(k_pool, v_pool, kmin, kmax, table, lengths, k, v, new_lens, streaming, *,
                 sink_pages: int, ring_pages: int, stats: bool = True, aligned: bool = False,
                 layer: int = 0, head_axis: str | None = None):
    """See `write_tokens_reference` (argument shapes there). `aligned`: the caller promises
    that every row that writes starts at a logical-page boundary (lengths % Nl == 0, as in a
    prefill or a page-aligned chunk); multi-token statistics are then reduced per logical page
    and stored once, instead of a scatter-min per token (16 colliding bf16 updates per logical
    page)."""
    if not (stats and aligned):
        return write_tokens_reference(k_pool, v_pool, kmin, kmax, table, lengths, k, v,
                                      new_lens, streaming, sink_pages=sink_pages,
                                      ring_pages=ring_pages, stats=stats, layer=layer,
                                      head_axis=head_axis)
    return _write_aligned(k_pool, v_pool, kmin, kmax, table, lengths, k, v, new_lens,
                          streaming, sink_pages=sink_pages, ring_pages=ring_pages, layer=layer,
                          head_axis=head_axis)


def _write_aligned(k_pool, v_pool, kmin, kmax, table, lengths, k, v, new_lens, streaming, *,
                   sink_pages, ring_pages, layer, head_axis):
    b, t, kh, h = k.shape
    n_l = k_pool.shape[1] // kmin.shape[1]
    k_pool, v_pool, _, _ = write_tokens_reference(
        k_pool, v_pool, kmin, kmax, table, lengths, k, v, new_lens, streaming,
        sink_pages=sink_pages, ring_pages=ring_pages, stats=False, layer=layer,
        head_axis=head_axis)
    pad = -t % n_l
    keys = jnp.pad(k.astype(kmin.dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
    valid = (jnp.arange(t + pad) < new_lens[:, None])[:, :, None, None]
    blocks = (b, (t + pad) // n_l, n_l, kh, h)
    lo = jnp.where(valid, keys, jnp.inf).reshape(blocks).min(axis=2)  # [B, T/Nl, K, H]
    hi = jnp.where(valid, keys, -jnp.inf).reshape(blocks).max(axis=2)
    phys, slot = destinations(table, lengths, new_lens, streaming, t + pad, k_pool.shape[1],
                              sink_pages=sink_pages, ring_pages=ring_pages)
    first = dropped(phys[:, ::n_l], k_pool.shape[0])  # each logical page's first token
    stat = slot[:, ::n_l] // n_l
    return (k_pool, v_pool, kmin.at[first, stat].set(lo, mode="drop"),
            kmax.at[first, stat].set(hi, mode="drop"))
