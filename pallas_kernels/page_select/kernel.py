"""Page selection kernels: Quest upper-bound scores from per-logical-page key min/max, and an
exact top-k by radix select (no sort).

Scores: one program per (row b, KV head k, chunk of pages). For each block of pages it gathers
their statistics rows and computes, for every query head of the group, relu(q).kmax +
min(q, 0).kmin (equal to sum_h max(q kmax, q kmin) when kmax >= kmin) as two small dots per
logical slot, keeps the max over the slots of each page, and reduces the group when asked.
Top-k: one program per selection row. It maps scores to order-preserving uint32 keys, finds the
k-th largest key bit by bit (32 counting passes over registers), then writes the chosen page
ids in ascending order with a prefix sum (ties go to the lower page).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._compat import NEG_INF, check_power_of_two


@dataclasses.dataclass(frozen=True)
class ScoreBlocks:
    pages_per_block: int = 32  # pages scored per dot (>= 16: Triton dot width)
    pages_per_program: int = 256
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_power_of_two("ScoreBlocks", pages_per_block=self.pages_per_block,
                           pages_per_program=self.pages_per_program, num_warps=self.num_warps)
        if self.pages_per_block < 16 or self.pages_per_program % self.pages_per_block:
            raise ValueError(f"ScoreBlocks.pages_per_block={self.pages_per_block} must be >= 16 "
                             f"and divide pages_per_program={self.pages_per_program}")


def _score_kernel(
    # inputs
    q_ref,  # [Gp, H] the KV head's query heads (rows >= G are zero)
    kmin_ref,  # [P * R, H] per-logical-page key minima (R logical pages per physical page)
    kmax_ref,  # [P * R, H] maxima
    table_ref,  # [M] int32 physical page of each logical page of this (row, layer, KV head)
    # outputs
    s_ref,  # [Gs, pages_per_program] f32 physical-page scores (Gs = Gp, or 1 when reduced)
    *,
    rows: int,
    groups: int,
    group_reduce: str,
    pages_per_block: int,
):
    chunk = pl.program_id(2)
    q = q_ref[...]
    pos = jnp.maximum(q, jnp.zeros_like(q))
    neg = jnp.minimum(q, jnp.zeros_like(q))
    per_program = s_ref.shape[1]
    last = table_ref.shape[0] - 1
    real = jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], pages_per_block), 0) < groups
    for blk in range(per_program // pages_per_block):
        first = chunk * per_program + blk * pages_per_block
        index = first + jax.lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
        ids = table_ref[jnp.minimum(index, last)]
        best = jnp.full((q.shape[0], pages_per_block), NEG_INF, jnp.float32)
        for r in range(rows):
            hi = kmax_ref[ids * rows + r]  # [pages_per_block, H]
            lo = kmin_ref[ids * rows + r]
            best = jnp.maximum(best, plgpu.dot(pos, hi.T) + plgpu.dot(neg, lo.T))
        if group_reduce == "sum":
            best = jnp.sum(jnp.where(real, best, 0.0), axis=0, keepdims=True)
        elif group_reduce == "max":
            best = jnp.max(jnp.where(real, best, NEG_INF), axis=0, keepdims=True)
        s_ref[:, pl.ds(blk * pages_per_block, pages_per_block)] = best


@functools.partial(jax.jit, static_argnames=("layer", "groups", "group_reduce", "width",
                                             "blocks", "interpret"))
def score_pages(q, kmin, kmax, table, *, layer: int, groups: int, group_reduce: str,
                width: int, blocks: ScoreBlocks, interpret: bool = False):
    """q: [B, K, Gp, H]; kmin, kmax: [P, R, H]; table: [B, L, K, M]. Returns [B, K, Gs, width]
    f32 (width a multiple of blocks.pages_per_program; pages past M score garbage)."""
    b, kh, gp, h = q.shape
    p, rows, _ = kmin.shape
    m = table.shape[3]
    per = blocks.pages_per_program
    gs = gp if group_reduce == "none" else 1
    kernel = functools.partial(_score_kernel, rows=rows, groups=groups,
                               group_reduce=group_reduce, pages_per_block=blocks.pages_per_block)
    flat = pl.BlockSpec((p * rows, h), lambda *_: (0, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, kh, width // per),
        in_specs=[pl.BlockSpec((None, None, gp, h), lambda i, j, c: (i, j, 0, 0)), flat, flat,
                  pl.BlockSpec((None, None, None, m), lambda i, j, c: (i, layer, j, 0))],
        out_specs=pl.BlockSpec((None, None, gs, per), lambda i, j, c: (i, j, 0, c)),
        out_shape=jax.ShapeDtypeStruct((b, kh, gs, width), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="page_scores",
    )(q, kmin.reshape(p * rows, h), kmax.reshape(p * rows, h), table)


def _topk_kernel(
    # inputs
    s_ref,  # [M'] f32 scores of one selection row (M' a power of two)
    lengths_ref,  # [B] int32 tokens held per row
    # outputs
    o_ref,  # [W] int32 chosen pages, ascending, then -1
    *,
    k: int,
    page_size: int,
    keep_sink_page: bool,
):
    b = pl.program_id(0)
    n_pages = (lengths_ref[b] + page_size - 1) // page_size
    s = s_ref[...]
    page = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    valid = page < n_pages - 1  # the current page is kept apart
    s = jnp.where(valid, s, -jnp.inf)
    if keep_sink_page:
        s = jnp.where((page == 0) & valid, jnp.inf, s)
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    ordered = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order == float order
    key = jax.lax.bitcast_convert_type(ordered ^ jnp.int32(-2**31), jnp.uint32)
    threshold = jnp.zeros((), jnp.uint32)
    for bit in range(31, -1, -1):  # the largest t with #(key >= t) >= k: the k-th largest key
        trial = threshold | jnp.uint32(1 << bit)
        enough = jnp.sum(((key >= trial) & valid).astype(jnp.int32)) >= k
        threshold = jnp.where(enough, trial, threshold)
    above = (key > threshold) & valid
    tied = ((key == threshold) & valid).astype(jnp.int32)
    room = k - jnp.sum(above.astype(jnp.int32))
    take = above | ((tied > 0) & (jnp.cumsum(tied) - tied < room))
    taken = take.astype(jnp.int32)
    o_ref[...] = jnp.full(o_ref.shape, -1, jnp.int32)
    plgpu.store(o_ref.at[jnp.cumsum(taken) - taken], page, mask=take)


@functools.partial(jax.jit, static_argnames=("groups", "k", "width", "page_size",
                                             "keep_sink_page", "interpret"))
def top_pages(scores, lengths, *, groups: int, k: int, width: int, page_size: int,
              keep_sink_page: bool, interpret: bool = False):
    """scores: [B, K, >= groups, M'] (M' a power of two; rows past `groups` are ignored) ->
    [B, K, groups, width] int32."""
    b, kh, _, m = scores.shape
    gs = groups
    kernel = functools.partial(_topk_kernel, k=k, page_size=page_size,
                               keep_sink_page=keep_sink_page)
    return pl.pallas_call(
        kernel,
        grid=(b, kh, gs),
        in_specs=[pl.BlockSpec((None, None, None, m), lambda i, j, g: (i, j, g, 0)),
                  pl.BlockSpec(lengths.shape, lambda *_: (0,))],
        out_specs=pl.BlockSpec((None, None, None, width), lambda i, j, g: (i, j, g, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh, gs, width), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="top_pages",
    )(scores, lengths)
