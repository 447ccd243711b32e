"""Public entry of the unified sparse paged decode op (same call as the reference)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant
from pallas_kernels._compat import layer_operand, next_power_of_two
from pallas_kernels.kv_quant import split_pool
from pallas_kernels.sparse_decode.kernel import DecodeBlocks, DecodeTuning, decode_partials
from pallas_kernels.sparse_decode.merge import merge_partials


def query_rows(groups: int) -> int:
    """Rows of the kernel's per-KV-head query block: the G heads, then zero rows up to a power
    of two >= 16 (Triton dots need >= 16 rows)."""
    return max(16, next_power_of_two(groups))


def _check(q, k_pool, v_pool, table, selected, lengths, modes, layer, g):
    b, kh, rows, h = q.shape
    if rows not in (g, query_rows(g)):
        raise ValueError(f"q has {rows} rows per KV head: give the G={g} query heads, or "
                         f"query_rows(G)={query_rows(g)} rows with zeros past G")
    if k_pool.shape != v_pool.shape or len(k_pool.shape) != 3 or k_pool.shape[2] != h:
        raise ValueError(f"k_pool {k_pool.shape} and v_pool {v_pool.shape} must both be "
                         f"[P, page_size, {h}]")
    n_layers = modes.shape[0]
    expected = {"table": (table.shape[:3], (b, n_layers, kh)),
                "selected": (selected.shape[:3], (n_layers, b, kh)),
                "lengths": (lengths.shape, (b,)), "modes": (modes.shape, (n_layers, kh))}
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"{name} has shape {tuple(got)}, expected {want} for q {q.shape}")
    if g % selected.shape[3]:
        raise ValueError(f"selected has {selected.shape[3]} lists per KV head; it must divide "
                         f"G={g}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} is outside [0, {n_layers})")


@functools.partial(jax.jit, static_argnames=("layer", "sink", "local", "budget_pages", "scale",
                                             "max_listed", "blocks", "groups", "tuning",
                                             "interpret"))
def sparse_decode(
    q: jax.Array,  # [B, K, G, H], or [B, K, query_rows(G), H] zero past G (then give groups)
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
    blocks: DecodeBlocks | None = None,
    groups: int | None = None,
    tuning: DecodeTuning = DecodeTuning(),
    interpret: bool = False,
) -> jax.Array:
    """Same result as `sparse_decode_reference` on q[:, :, :G]; returns [B, K, G, H] in q's
    dtype. `max_listed` (default M) bounds every head's list length; it sizes the key splits.
    `groups`: G when q arrives padded to the kernel's rows (as the fused append writes it).
    `blocks` overrides the tiling that `tuning` derives for the shape."""
    g = groups or q.shape[2]
    _check(q, k_pool, v_pool, table, selected, lengths, modes, layer, g)
    b, kh, _, h = q.shape
    gs, w = selected.shape[3], selected.shape[4]
    n_p, m = k_pool.shape[1], table.shape[3]
    listed = min(m, max_listed or m)
    if blocks is None:
        blocks = DecodeBlocks.for_shape(n_p, listed, b * kh * gs, tuning)
    if blocks.pages_per_block > w:  # the selection row must hold a whole block
        blocks = dataclasses.replace(blocks, pages_per_block=w,
                                     pages_per_split=max(w, blocks.pages_per_split))
    splits = max(1, -(-listed // blocks.pages_per_split))
    gp = query_rows(g)
    (k_codes, k_scale), (v_codes, v_scale) = split_pool(k_pool), split_pool(v_pool)
    o, mx, l = decode_partials(
        jnp.pad(q, ((0, 0), (0, 0), (0, gp - q.shape[2]), (0, 0))), k_codes, v_codes, k_scale,
        v_scale, table, selected.astype(jnp.int32), lengths.astype(jnp.int32),
        modes.astype(jnp.int32), layer_operand(layer),
        scale=h ** -0.5 if scale is None else scale, sink=sink, local=local,
        budget_pages=budget_pages, heads_per_list=g // gs, splits=splits, blocks=blocks,
        kind=kv_quant.pool_kind(k_pool), interpret=interpret)
    # every (list, split) partial of a KV head is one more term of the same log-sum-exp
    return merge_partials(o.reshape(b, kh, gs * splits, gp, h), mx.reshape(b, kh, -1, gp),
                          l.reshape(b, kh, -1, gp), groups=g, dtype=q.dtype,
                          chunk=tuning.merge_chunk, block_h=tuning.merge_block_h,
                          interpret=interpret)
