"""Page scoring kernel: Quest upper bounds from per-logical-page key min/max.

One program per (row b, KV head k, chunk of `pages_per_program` logical pages). For each block
of `pages_per_block` pages it gathers their statistics rows and computes, for every query head
of the group, relu(q).kmax + min(q, 0).kmin (equal to sum_h max(q kmax, q kmin) when
kmax >= kmin) as two small dots per logical slot, keeping the max over the slots of each page.
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
    table_ref,  # [Mp] int32 physical page of each logical page of this (row, KV head)
    # outputs
    s_ref,  # [Gp, pages_per_program] f32 physical-page scores
    *,
    rows: int,
    pages_per_block: int,
):
    chunk = pl.program_id(2)
    q = q_ref[...]
    pos = jnp.maximum(q, jnp.zeros_like(q))
    neg = jnp.minimum(q, jnp.zeros_like(q))
    per_program = s_ref.shape[1]
    for blk in range(per_program // pages_per_block):
        ids = table_ref[pl.ds(chunk * per_program + blk * pages_per_block, pages_per_block)]
        best = jnp.full((q.shape[0], pages_per_block), NEG_INF, jnp.float32)
        for r in range(rows):
            hi = kmax_ref[ids * rows + r]  # [pages_per_block, H]
            lo = kmin_ref[ids * rows + r]
            score = plgpu.dot(pos, hi.T) + plgpu.dot(neg, lo.T)
            best = jnp.maximum(best, score)
        s_ref[:, pl.ds(blk * pages_per_block, pages_per_block)] = best


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def score_pages(q, kmin, kmax, table, *, blocks: ScoreBlocks, interpret: bool = False):
    """q: [B, K, Gp, H]; kmin, kmax: [P, R, H]; table: [B, K, Mp] (Mp a multiple of
    blocks.pages_per_program). Returns [B, K, Gp, Mp] f32."""
    b, kh, gp, h = q.shape
    p, rows, _ = kmin.shape
    mp = table.shape[2]
    per = blocks.pages_per_program
    kernel = functools.partial(_score_kernel, rows=rows, pages_per_block=blocks.pages_per_block)
    flat = pl.BlockSpec((p * rows, h), lambda *_: (0, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, kh, mp // per),
        in_specs=[pl.BlockSpec((None, None, gp, h), lambda i, j, c: (i, j, 0, 0)), flat, flat,
                  pl.BlockSpec((None, None, mp), lambda i, j, c: (i, j, 0))],
        out_specs=pl.BlockSpec((None, None, gp, per), lambda i, j, c: (i, j, 0, c)),
        out_shape=jax.ShapeDtypeStruct((b, kh, gp, mp), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="page_scores",
    )(q, kmin.reshape(p * rows, h), kmax.reshape(p * rows, h), table)
