"""Decode-time KV append: one new token per (row, KV head) written in place into the shared
pool (aliased outputs; the caller donates the cache), with the logical page's key min/max
updated in the same program (restarted from the key on the page's first token)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._compat import whole


def _append_kernel(
    # inputs
    k_ref,  # [H] new key of this (row, KV head)
    v_ref,  # [H] new value
    phys_ref,  # [B, K] int32 destination page (0: trash)
    slot_ref,  # [B] int32 token slot in the page
    k_pool_in,  # [P, Np, H] (aliased to k_pool)
    v_pool_in,  # [P, Np, H] (aliased to v_pool)
    kmin_in,  # [P * R, H] (aliased to kmin)
    kmax_in,  # [P * R, H] (aliased to kmax)
    # outputs
    k_pool,  # [P, Np, H]
    v_pool,  # [P, Np, H]
    kmin,  # [P * R, H]
    kmax,  # [P * R, H]
    *,
    logical_page: int,
    stats: bool,
):
    del k_pool_in, v_pool_in
    b, kh = pl.program_id(0), pl.program_id(1)
    page = phys_ref[b, kh]
    slot = slot_ref[b]
    key = k_ref[...]
    k_pool[page, slot, :] = key
    v_pool[page, slot, :] = v_ref[...]
    if stats:
        rows = k_pool.shape[1] // logical_page
        row = page * rows + slot // logical_page
        first = slot % logical_page == 0
        kmin[row, :] = jnp.where(first, key, jnp.minimum(kmin_in[row, :], key))
        kmax[row, :] = jnp.where(first, key, jnp.maximum(kmax_in[row, :], key))


@functools.partial(jax.jit, static_argnames=("logical_page", "stats", "interpret"))
def append_token(k, v, phys, slot, k_pool, v_pool, kmin, kmax, *, logical_page: int,
                 stats: bool, interpret: bool = False):
    """k, v: [B, K, H]; phys: [B, K]; slot: [B]; pools [P, Np, H]; kmin/kmax [P', Np/Nl, H].
    Returns the updated (k_pool, v_pool, kmin, kmax): in place when the caller's jit donates
    them (otherwise XLA copies to honour the aliasing)."""
    b, kh, h = k.shape
    shape_stats = kmin.shape
    flat_stats = (shape_stats[0] * shape_stats[1], h)

    row = pl.BlockSpec((None, None, h), lambda i, j: (i, j, 0))
    outs = pl.pallas_call(
        functools.partial(_append_kernel, logical_page=logical_page, stats=stats),
        grid=(b, kh),
        in_specs=[row, row, whole(phys), whole(slot), whole(k_pool), whole(v_pool),
                  whole(flat_stats), whole(flat_stats)],
        out_specs=[whole(k_pool), whole(v_pool), whole(flat_stats), whole(flat_stats)],
        out_shape=[jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype),
                   jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype),
                   jax.ShapeDtypeStruct(flat_stats, kmin.dtype),
                   jax.ShapeDtypeStruct(flat_stats, kmax.dtype)],
        input_output_aliases={4: 0, 5: 1, 6: 2, 7: 3},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="kv_append",
    )(k.astype(k_pool.dtype), v.astype(v_pool.dtype), phys, slot, k_pool, v_pool,
      kmin.reshape(flat_stats), kmax.reshape(flat_stats))
    return outs[0], outs[1], outs[2].reshape(shape_stats), outs[3].reshape(shape_stats)
