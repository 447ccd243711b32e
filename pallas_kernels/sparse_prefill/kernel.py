"""Fused sparse prefill attention (dense + streaming heads): the Pallas (Triton) kernel.

One program per (query tile, row b, query head n). The head's KV-head mode is data: a dense
head walks every causal key tile; a streaming head walks only its sink tiles and the tiles of
its local window (a skipped tile is never loaded). Tiles wholly below the diagonal and inside
the window run unmasked; only edge tiles (diagonal, window start, sink end, ragged length) are
masked token-exactly. Query tiles are issued longest first, so the causal tail is short.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._compat import LOG2_E, NEG_INF, check_power_of_two


@dataclasses.dataclass(frozen=True)
class PrefillBlocks:
    block_q: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        check_power_of_two("PrefillBlocks", block_q=self.block_q, block_k=self.block_k,
                           num_warps=self.num_warps)
        if min(self.block_q, self.block_k) < 16:
            raise ValueError(f"PrefillBlocks tiles must be >= 16 (Triton dots), got {self}")


def _prefill_kernel(
    # inputs
    q_ref,  # [bq, H] one query tile of one head
    k_ref,  # [S, H] keys of the head's KV head
    v_ref,  # [S, H] values
    q_lens_ref,  # [B] int32 valid query rows
    kv_lens_ref,  # [B] int32 valid keys (the queries are the last q_lens of them)
    stream_ref,  # [K] int32 1 for streaming KV heads
    # outputs
    o_ref,  # [bq, H]
    *,
    scale: float,
    sink: int,
    local: int,
    groups: int,
    tiles: int,
    block_k: int,
):
    i = tiles - 1 - pl.program_id(0)  # longest (last) query tiles first
    b, n = pl.program_id(1), pl.program_id(2)
    bq, h = q_ref.shape
    bk = block_k
    q_len, kv_len = q_lens_ref[b], kv_lens_ref[b]
    streaming = stream_ref[n // groups] != 0
    first = kv_len - q_len + i * bq  # position of the tile's first query row
    last = first + bq - 1
    rows = first + jax.lax.broadcasted_iota(jnp.int32, (bq,), 0)
    row_ok = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq,), 0) < q_len
    n_tiles = jnp.clip(pl.cdiv(jnp.minimum(kv_len, last + 1), bk), 0, k_ref.shape[0] // bk)
    n_tiles = jnp.where(i * bq < q_len, n_tiles, 0)  # a tile of padding rows does no work
    n_clean = jnp.minimum((first + 1) // bk, kv_len // bk)  # tiles every row sees whole
    sink_tiles = jnp.where(streaming, jnp.minimum(pl.cdiv(sink, bk), n_tiles), 0)
    window_lo = jnp.where(streaming, jnp.maximum((first - local) // bk, sink_tiles), 0)
    window_lo = jnp.minimum(window_lo, n_tiles)
    clean_lo = jnp.where(streaming, pl.cdiv(last - local, bk), 0)  # every row sees it whole
    a = jnp.clip(clean_lo, window_lo, n_tiles)
    c = jnp.clip(n_clean, a, n_tiles)
    q = q_ref[...]

    def step(j, carry, masked: bool):
        o, m, l = carry
        keys = k_ref[pl.ds(j * bk, bk), :]
        values = v_ref[pl.ds(j * bk, bk), :]
        s = plgpu.dot(q, keys.T) * (scale * LOG2_E)  # [bq, bk] f32
        if masked:
            cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
            window = (cols[None, :] < sink) | (cols[None, :] >= rows[:, None] - local)
            visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] < kv_len) & (
                window | ~streaming)
            s = jnp.where(visible, s, NEG_INF)
            values = jnp.where((cols < kv_len)[:, None], values, jnp.zeros_like(values))
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(visible, p, 0.0)
        o = alpha[:, None] * o + plgpu.dot(p.astype(values.dtype), values)
        return o, m_new, alpha * l + jnp.sum(p, axis=1)

    carry = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    masked = functools.partial(step, masked=True)
    carry = jax.lax.fori_loop(0, sink_tiles, masked, carry)  # streaming: sink
    carry = jax.lax.fori_loop(window_lo, a, masked, carry)  # streaming: window start
    carry = jax.lax.fori_loop(a, c, functools.partial(step, masked=False), carry)
    o, _, l = jax.lax.fori_loop(c, n_tiles, masked, carry)  # the diagonal
    o = o / jnp.where(l > 0, l, 1.0)[:, None]
    o_ref[...] = jnp.where(row_ok[:, None], o, 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "sink", "local", "blocks", "interpret"))
def prefill_attention(q, k, v, q_lens, kv_lens, streaming, *, scale: float, sink: int,
                      local: int, blocks: PrefillBlocks, interpret: bool = False):
    """q: [B, T, N, H]; k, v: [B, S, K, H] with T, S multiples of the tiles; q_lens, kv_lens:
    [B]; streaming: [K] int32. Returns [B, T, N, H] in q's dtype."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    tiles = t // bq
    kernel = functools.partial(_prefill_kernel, scale=scale, sink=sink, local=local,
                               groups=n // kh, tiles=tiles, block_k=bk)

    def kv_spec():
        return pl.BlockSpec((None, s, None, h), lambda i, j, x: (j, 0, x // (n // kh), 0))

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,))

    return pl.pallas_call(
        kernel,
        grid=(tiles, b, n),
        in_specs=[pl.BlockSpec((None, bq, None, h), lambda i, j, x: (j, tiles - 1 - i, x, 0)),
                  kv_spec(), kv_spec(), whole(q_lens), whole(kv_lens), whole(streaming)],
        out_specs=pl.BlockSpec((None, bq, None, h), lambda i, j, x: (j, tiles - 1 - i, x, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="sparse_prefill",
    )(q, k, v, q_lens, kv_lens, streaming)
