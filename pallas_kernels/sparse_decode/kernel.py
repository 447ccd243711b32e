"""Unified sparse paged decode attention: the Pallas (Triton) kernel and its wrapper.

One program per (row b, KV head k, page list gs, key split): it walks its share of the list,
`pages_per_block` pages per step, gathering whole pages of the shared pool by physical id, and
keeps an f32 online-softmax partial (o, m, l) for all G query heads of the KV head at once (so a
page loaded for a GQA group is read once). Partials of the splits (and of the per-query-head
lists) are merged after the kernel (flash-decoding). Masks are token-exact: entries past the
list's count, keys after the current token, and keys outside a streaming head's sink + local
window get probability 0 and their values are zeroed, so NaN in unused slots never leaks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._compat import LOG2_E, NEG_INF, check_power_of_two, next_power_of_two

TARGET_PROGRAMS = 528  # ~4 programs per H200 SM (132 SMs) keeps every SM busy


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    pages_per_block: int  # pages gathered per loop step (x page_size keys)
    pages_per_split: int  # list entries one program walks
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_power_of_two("DecodeBlocks", pages_per_block=self.pages_per_block,
                           pages_per_split=self.pages_per_split, num_warps=self.num_warps)
        if self.pages_per_split % self.pages_per_block:
            raise ValueError(f"DecodeBlocks.pages_per_split={self.pages_per_split} must be a "
                             f"multiple of pages_per_block={self.pages_per_block}")

    @classmethod
    def for_shape(cls, page_size: int, list_width: int, programs: int,
                  block_tokens: int = 128, **kwargs) -> DecodeBlocks:
        """Blocks of ~block_tokens keys; enough splits that ~TARGET_PROGRAMS programs run."""
        ppb = max(1, block_tokens // page_size)
        splits = max(1, TARGET_PROGRAMS // max(1, programs))
        pps = next_power_of_two(max(ppb, -(-list_width // splits)))
        return cls(pages_per_block=ppb, pages_per_split=max(pps, ppb), **kwargs)


def _decode_kernel(
    # inputs
    q_ref,  # [Gp, H] the KV head's query heads (rows >= G are zero padding)
    k_ref,  # [P, Np, H] key pool, gathered by physical page
    v_ref,  # [P, Np, H] value pool
    phys_ref,  # [S] int32 physical pages of this list (padding: page 0)
    logical_ref,  # [S] int32 logical page numbers of the same entries
    counts_ref,  # [B, K, Gs] int32 entries in use per list
    lengths_ref,  # [B] int32 tokens held per row (the current token is the last)
    stream_ref,  # [K] int32 1 for streaming heads
    # outputs
    o_ref,  # [Gp, H] f32 unnormalised partial output of this split
    m_ref,  # [Gp] f32 running max of the logits (log2 units)
    l_ref,  # [Gp] f32 softmax denominator
    *,
    scale: float,
    sink: int,
    local: int,
    pages_per_block: int,
    pages_per_split: int,
):
    b, kh, g, split = (pl.program_id(i) for i in range(4))
    gp, h = q_ref.shape
    n_p = k_ref.shape[1]
    block = pages_per_block * n_p
    count = counts_ref[b, kh, g]
    start = split * pages_per_split
    steps = jnp.clip(pl.cdiv(count - start, pages_per_block), 0,
                     pages_per_split // pages_per_block)
    t = lengths_ref[b] - 1
    streaming = stream_ref[kh] != 0
    q = q_ref[...]
    in_page = jax.lax.broadcasted_iota(jnp.int32, (pages_per_block, n_p), 1)
    entry_of = jax.lax.broadcasted_iota(jnp.int32, (pages_per_block, n_p), 0)

    def body(i, carry):
        o, m, l = carry
        base = start + i * pages_per_block
        ids = phys_ref[pl.ds(base, pages_per_block)]
        logical = logical_ref[pl.ds(base, pages_per_block)]
        keys = k_ref[ids].reshape(block, h)
        values = v_ref[ids].reshape(block, h)
        pos = (logical[:, None] * n_p + in_page).reshape(block)
        used = (base + entry_of < count).reshape(block)
        window = (pos < sink) | (pos >= t - local)
        visible = used & (pos <= t) & (window | ~streaming)
        s = plgpu.dot(q, keys.T) * (scale * LOG2_E)  # [Gp, block] f32
        s = jnp.where(visible[None, :], s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(visible[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
        values = jnp.where(visible[:, None], values, jnp.zeros_like(values))
        o = alpha[:, None] * o + plgpu.dot(p.astype(values.dtype), values)
        return o, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((gp, h), jnp.float32), jnp.full((gp,), NEG_INF, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "sink", "local", "blocks", "interpret"))
def decode_partials(q, k_pool, v_pool, phys, logical, counts, lengths, streaming, *, scale,
                    sink, local, blocks: DecodeBlocks, interpret: bool = False):
    """Runs the kernel. q: [B, K, Gp, H]; phys, logical: [B, K, Gs, S] with S a multiple of
    blocks.pages_per_split; counts: [B, K, Gs]; lengths: [B]; streaming: [K] int32.
    Returns o [B, K, Gs, splits, Gp, H] f32 and m, l [B, K, Gs, splits, Gp] f32."""
    b, kh, gp, h = q.shape
    gs, s = phys.shape[2], phys.shape[3]
    splits = s // blocks.pages_per_split
    grid = (b, kh, gs, splits)
    kernel = functools.partial(
        _decode_kernel, scale=scale, sink=sink, local=local,
        pages_per_block=blocks.pages_per_block, pages_per_split=blocks.pages_per_split)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    def one_list(i, j, g, _):
        return i, j, g, 0

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, gp, h), lambda i, j, g, _: (i, j, 0, 0)),
            whole(k_pool), whole(v_pool),
            pl.BlockSpec((None, None, None, s), one_list),
            pl.BlockSpec((None, None, None, s), one_list),
            whole(counts), whole(lengths), whole(streaming),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, None, gp, h), lambda i, j, g, x: (i, j, g, x, 0, 0)),
            pl.BlockSpec((None, None, None, None, gp), lambda i, j, g, x: (i, j, g, x, 0)),
            pl.BlockSpec((None, None, None, None, gp), lambda i, j, g, x: (i, j, g, x, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, gs, splits, gp, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, gs, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, gs, splits, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="sparse_paged_decode",
    )(q, k_pool, v_pool, phys, logical, counts, lengths, streaming)
