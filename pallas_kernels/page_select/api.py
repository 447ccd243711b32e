"""Public entry of page scoring (kernel) and selection (`lax.top_k`, outside any kernel)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._compat import next_power_of_two
from pallas_kernels.page_select.kernel import ScoreBlocks, score_pages
from pallas_kernels.page_select.reference import reduce_groups, select_pages_reference

select_pages = select_pages_reference  # top-k stays in XLA: lax.top_k does not lower in Triton


@functools.partial(jax.jit, static_argnames=("group_reduce", "blocks", "interpret"))
def page_scores(
    q: jax.Array,  # [B, K, G, H]
    kmin: jax.Array,  # [P, Np/Nl, H]
    kmax: jax.Array,  # [P, Np/Nl, H]
    table: jax.Array,  # [B, K, M] int32
    *,
    group_reduce: str = "none",
    blocks: ScoreBlocks | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same result as `page_scores_reference`: [B, K, Gs, M] f32."""
    b, kh, g, h = q.shape
    if kmin.shape != kmax.shape or kmin.shape[2] != h:
        raise ValueError(f"kmin {kmin.shape} and kmax {kmax.shape} must be [P, R, {h}]")
    if table.shape[:2] != (b, kh):
        raise ValueError(f"table has shape {table.shape}, expected ({b}, {kh}, M)")
    m = table.shape[2]
    if blocks is None:
        per = min(256, max(16, next_power_of_two(m)))
        blocks = ScoreBlocks(pages_per_block=min(32, per), pages_per_program=per)
    width = -(-m // blocks.pages_per_program) * blocks.pages_per_program
    table = jnp.pad(jnp.clip(table, 0, kmin.shape[0] - 1), ((0, 0), (0, 0), (0, width - m)))
    gp = max(16, next_power_of_two(g))
    q_rows = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    scores = score_pages(q_rows, kmin, kmax, table.astype(jnp.int32), blocks=blocks,
                         interpret=interpret)
    return reduce_groups(scores[:, :, :g, :m], group_reduce)
