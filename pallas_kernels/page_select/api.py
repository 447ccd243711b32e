"""Public entries of page scoring and top-k page selection (same calls as the references)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._compat import check_power_of_two, layer_operand, next_power_of_two
from pallas_kernels.page_select.kernel import ScoreBlocks, SelectTuning, score_pages, top_pages
from pallas_kernels.page_select.reference import trim_to_mass, with_anchor


def _scores(q, kmin, kmax, table, lengths, modes, layer, group_reduce, page_size, blocks,
            min_width, target_programs, interpret):
    b, kh, g, h = q.shape
    if kmin.shape != kmax.shape or kmin.shape[2] != h:
        raise ValueError(f"kmin {kmin.shape} and kmax {kmax.shape} must be [P, R, {h}]")
    if table.ndim != 4 or (table.shape[0], table.shape[2]) != (b, kh):
        raise ValueError(f"table has shape {table.shape}, expected ({b}, L, {kh}, M)")
    if modes.shape != (table.shape[1], kh):
        raise ValueError(f"modes has shape {modes.shape}, expected {(table.shape[1], kh)}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths has shape {lengths.shape}, expected ({b},)")
    if not 0 <= layer < table.shape[1]:
        raise ValueError(f"layer={layer} is outside [0, {table.shape[1]})")
    if group_reduce not in ("none", "sum", "max"):
        raise ValueError(f"group_reduce={group_reduce!r} is invalid: use 'none', 'sum' or 'max'")
    width = next_power_of_two(max(table.shape[3], min_width))
    blocks = blocks or ScoreBlocks.for_shape(width, b * kh, target_programs)
    gp = max(16, next_power_of_two(g))  # Triton dots need >= 16 rows
    return score_pages(jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0))), kmin, kmax,
                       table.astype(jnp.int32), lengths.astype(jnp.int32),
                       modes.astype(jnp.int32), layer_operand(layer), groups=g,
                       group_reduce=group_reduce, page_size=page_size,
                       width=max(width, blocks.pages_per_program), blocks=blocks,
                       interpret=interpret)


@functools.partial(jax.jit, static_argnames=("layer", "page_size", "group_reduce", "blocks",
                                             "tuning", "interpret"))
def page_scores(q, kmin, kmax, table, lengths, modes, *, layer: int, page_size: int,
                group_reduce: str = "none", blocks: ScoreBlocks | None = None,
                tuning: SelectTuning = SelectTuning(), interpret: bool = False) -> jax.Array:
    """Same result as `page_scores_reference`: [B, K, Gs, M] f32."""
    scores = _scores(q, kmin, kmax, table, lengths, modes, layer, group_reduce, page_size,
                     blocks, 1, tuning.target_programs, interpret)
    gs = q.shape[2] if group_reduce == "none" else 1
    return scores[:, :, :gs, : table.shape[3]]


@functools.partial(jax.jit, static_argnames=("layer", "k", "width", "page_size",
                                             "group_reduce", "keep_sink_page", "anchor", "p",
                                             "floor", "scale", "blocks", "tuning", "interpret"))
def select_pages(
    q: jax.Array,  # [B, K, G, H]
    kmin: jax.Array,  # [P, Np/Nl, H]
    kmax: jax.Array,  # [P, Np/Nl, H]
    table: jax.Array,  # [B, L, K, M] int32
    lengths: jax.Array,  # [B] int32 tokens held
    modes: jax.Array,  # [L, K] int DENSE / SELECT / STREAM
    *,
    layer: int,
    k: int,
    width: int,
    page_size: int,
    group_reduce: str = "none",
    keep_sink_page: bool = False,
    anchor: bool = False,
    p: float = 1.0,
    floor: int = 1,
    scale: float = 1.0,
    blocks: ScoreBlocks | None = None,
    tuning: SelectTuning = SelectTuning(),
    interpret: bool = False,
) -> jax.Array:
    """The k best pages per selection row, as `select_pages_reference(page_scores_reference(
    ...), lengths, modes[layer], ...)`: [B, K, Gs, width] int32, ascending, -1 padded; all -1
    for heads whose mode is not SELECT (nothing of theirs is read). Scores and top-k are two
    kernels; no sort runs. `blocks` tiles the score kernel (default: ScoreBlocks.for_shape
    at tuning.target_programs); the top-k finds the k-th best score tuning.radix_bits bits a
    pass. p < 1 (the adaptive budget) and `anchor` post-process the k pages in jnp as the
    reference does (`trim_to_mass`, `with_anchor`)."""
    if not 0 < k + anchor <= width:
        raise ValueError(f"k={k} (+1 with anchor={anchor}) must lie in (0, width={width}]")
    check_power_of_two("select_pages", width=width)
    scores = _scores(q, kmin, kmax, table, lengths, modes, layer, group_reduce, page_size,
                     blocks, width, tuning.target_programs, interpret)
    chosen = top_pages(scores, lengths.astype(jnp.int32), modes.astype(jnp.int32),
                       layer_operand(layer),
                       groups=q.shape[2] if group_reduce == "none" else 1, k=k, width=width,
                       page_size=page_size, keep_sink_page=keep_sink_page,
                       radix_bits=tuning.radix_bits,
                       chunk=min(scores.shape[-1], tuning.topk_chunk >> tuning.radix_bits),
                       num_warps=tuning.topk_warps, interpret=interpret)
    if p < 1.0:
        gs = chosen.shape[2]
        chosen = trim_to_mass(chosen, scores[:, :, :gs], lengths, page_size=page_size, p=p,
                              floor=floor, scale=scale, keep_sink_page=keep_sink_page)
    return with_anchor(chosen, lengths, modes[layer], page_size=page_size) if anchor else chosen
