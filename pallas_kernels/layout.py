"""The paged-cache layout every op, reference and caller shares, defined once.

- Head modes ([L, K] int tables, read as data by every kernel): DENSE attends to every page,
  SELECT to its selected pages in decode (full causal in prefill), STREAM to the sink pages
  and a local window.
- Pools `[P, Np, H]` hold one (layer, KV head)'s `Np` tokens per physical page; statistics
  `[P, Np/Nl, H]` hold the channel-wise min/max of each logical page of `Nl` tokens.
- Physical page 0 is the trash page: a token that must not land (padding, inactive rows,
  streaming-head tokens that the ring would overwrite anyway) is routed there, and nothing
  reads it.
- A streaming head keeps `sink_pages` pages, then a ring of `ring_pages` pages: its page table
  maps logical page j >= sink_pages to slot `sink_pages + (j - sink_pages) % ring_pages`.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np


class HeadMode(enum.IntEnum):
    DENSE = 0
    SELECT = 1
    STREAM = 2


DENSE, SELECT, STREAM = HeadMode.DENSE, HeadMode.SELECT, HeadMode.STREAM
TRASH_PAGE = 0


def sink_pages(sink: int, page_size: int) -> int:
    """Pages that hold the first `sink` tokens."""
    return -(-sink // page_size)


def ring_slots(n_pages: int, streaming: bool, sink: int, ring: int) -> np.ndarray:
    """[n_pages] for each logical page, the index of the reserved physical page that holds it:
    itself for a dense head; the sink pages, then a ring of `ring` pages, for a streaming one."""
    j = np.arange(n_pages)
    if not streaming:
        return j
    return np.where(j < sink, j, sink + (j - sink) % ring)


def destinations(table, lengths, new_lens, streaming, t: int, n_p: int, *, sink_pages: int,
                 ring_pages: int) -> tuple[jax.Array, jax.Array]:
    """Where each new token lands: (physical page [B, T, K], slot in the page [B, T, 1]).

    Token t of row b sits at position lengths[b] + t and is written iff t < new_lens[b]; a
    streaming head's token lands only if its page is a sink page or one of the last
    `ring_pages` pages after this write (the ring would overwrite the rest). The rest go to
    the trash page. table: [B, K, M] int32; lengths, new_lens: [B]; streaming: [K] bool.
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


def dropped(phys: jax.Array, num_pages: int) -> jax.Array:
    """Trash-page destinations made out of range, for scatters with mode="drop": the update is
    skipped instead of landing (a prefill sends most streaming-head tokens to the trash page,
    and thousands of updates colliding on one page serialise on the GPU)."""
    return jnp.where(phys == TRASH_PAGE, num_pages, phys)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in HF's convention (channel pairs (i, i + H/2)) computed in f32 and rounded once
    to x's dtype. x: [..., M, H]; cos, sin: [..., H/2] f32, broadcast over the heads M."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
