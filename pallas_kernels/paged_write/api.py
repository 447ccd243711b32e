"""Public entry of the paged write: decode appends go through the Pallas kernel, multi-token
writes (prefill) through the reference scatter. Same call and result as the reference."""

from __future__ import annotations

import functools

import jax

from pallas_kernels.paged_write.kernel import append_token
from pallas_kernels.paged_write.reference import destinations, write_tokens_reference


@functools.partial(jax.jit, static_argnames=("sink_pages", "ring_pages", "stats", "interpret"))
def write_tokens(k_pool, v_pool, kmin, kmax, table, lengths, k, v, new_lens, streaming, *,
                 sink_pages: int, ring_pages: int, stats: bool = True, interpret: bool = False):
    """See `write_tokens_reference` (argument shapes there)."""
    if k.shape[1] != 1:
        return write_tokens_reference(k_pool, v_pool, kmin, kmax, table, lengths, k, v,
                                      new_lens, streaming, sink_pages=sink_pages,
                                      ring_pages=ring_pages, stats=stats)
    phys, slot = destinations(table, lengths, new_lens, streaming, 1, k_pool.shape[1],
                              sink_pages=sink_pages, ring_pages=ring_pages)
    return append_token(k[:, 0], v[:, 0], phys[:, 0], slot[:, 0, 0], k_pool, v_pool, kmin, kmax,
                        logical_page=k_pool.shape[1] // kmin.shape[1], stats=stats,
                        interpret=interpret)
