"""Decode-time KV append fused with RoPE: one program per (row, KV head) reads the new token's
q/k/v projections, rotates the key and the KV head's query heads, writes the key and value in
place into the shared pool (aliased outputs; the caller donates the cache), updates the logical
page's key min/max (restarted from the key on the page's first token), and writes the rotated
queries as the decode kernel's zero-padded [Gp, H] block. One launch replaces the q and k
rotations, the value slice, the query padding and the append (five small kernels a layer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._compat import whole


def _append_kernel(
    # inputs
    qkv_ref,  # [B, N + 2K, H] this token's projections: N query, K key, K value heads
    cos_ref,  # [H/2] f32 rotation of this row's position
    sin_ref,  # [H/2] f32
    phys_ref,  # [B, K] int32 destination page (0: trash)
    slot_ref,  # [B] int32 token slot in the page
    k_pool_in,  # [P, Np, H] (aliased to k_pool)
    v_pool_in,  # [P, Np, H] (aliased to v_pool)
    kmin_in,  # [P * R, H] (aliased to kmin)
    kmax_in,  # [P * R, H] (aliased to kmax)
    # outputs
    q_ref,  # [Gp, H] rotated query heads of this KV head; rows >= G zero
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
    n_kv = phys_ref.shape[1]
    n_q = qkv_ref.shape[1] - 2 * n_kv
    groups = n_q // n_kv
    gp, h = q_ref.shape
    half = h // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    cos, sin = cos_ref[...], sin_ref[...]

    def rotate(x1, x2):  # HF's convention: channel pairs (i, i + H/2), in f32
        x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    page, slot = phys_ref[b, kh], slot_ref[b]
    row = page * (k_pool.shape[1] // logical_page) + slot // logical_page
    if stats:  # loaded first: no store of this program stands between them and their address
        old = [(kmin_in[row, part], kmax_in[row, part]) for part in (lo, hi)]
    key = [x.astype(k_pool.dtype) for x in rotate(qkv_ref[b, n_q + kh, lo],
                                                  qkv_ref[b, n_q + kh, hi])]
    k_pool[page, slot, lo] = key[0]
    k_pool[page, slot, hi] = key[1]
    v_pool[page, slot, :] = qkv_ref[b, n_q + n_kv + kh, :].astype(v_pool.dtype)
    if stats:
        first = slot % logical_page == 0
        for part, x, (low, high) in zip((lo, hi), key, old):
            x = x.astype(kmin.dtype)
            kmin[row, part] = jnp.where(first, x, jnp.minimum(low, x))
            kmax[row, part] = jnp.where(first, x, jnp.maximum(high, x))

    head = jax.lax.broadcasted_iota(jnp.int32, (gp,), 0)
    real = head < groups
    rows = jnp.where(real, kh * groups + head, 0)  # padding rows read head 0, then zeroed
    q1, q2 = rotate(qkv_ref[b, rows, lo], qkv_ref[b, rows, hi])
    q_ref[:, lo] = jnp.where(real[:, None], q1, 0.0).astype(q_ref.dtype)
    q_ref[:, hi] = jnp.where(real[:, None], q2, 0.0).astype(q_ref.dtype)


@functools.partial(jax.jit, static_argnames=("q_rows", "logical_page", "stats", "interpret"))
def append_rotated(qkv, cos, sin, phys, slot, k_pool, v_pool, kmin, kmax, *, q_rows: int,
                   logical_page: int, stats: bool, interpret: bool = False):
    """qkv: [B, N + 2K, H]; cos, sin: [B, H/2] f32; phys: [B, K]; slot: [B]; pools [P, Np, H];
    kmin/kmax [P', Np/Nl, H]. Returns (q [B, K, q_rows, H] in qkv's dtype, k_pool, v_pool,
    kmin, kmax): the pools in place when the caller's jit donates them (otherwise XLA copies
    to honour the aliasing)."""
    b, kh = phys.shape
    h = qkv.shape[2]
    shape_stats = kmin.shape
    flat_stats = (shape_stats[0] * shape_stats[1], h)
    angle = pl.BlockSpec((None, h // 2), lambda i, j: (i, 0))
    outs = pl.pallas_call(
        functools.partial(_append_kernel, logical_page=logical_page, stats=stats),
        grid=(b, kh),
        in_specs=[whole(qkv), angle, angle, whole(phys), whole(slot), whole(k_pool),
                  whole(v_pool), whole(flat_stats), whole(flat_stats)],
        out_specs=[pl.BlockSpec((None, None, q_rows, h), lambda i, j: (i, j, 0, 0)),
                   whole(k_pool), whole(v_pool), whole(flat_stats), whole(flat_stats)],
        out_shape=[jax.ShapeDtypeStruct((b, kh, q_rows, h), qkv.dtype),
                   jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype),
                   jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype),
                   jax.ShapeDtypeStruct(flat_stats, kmin.dtype),
                   jax.ShapeDtypeStruct(flat_stats, kmax.dtype)],
        input_output_aliases={5: 1, 6: 2, 7: 3, 8: 4},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="kv_append",
    )(qkv, cos.astype(jnp.float32), sin.astype(jnp.float32), phys, slot, k_pool, v_pool,
      kmin.reshape(flat_stats), kmax.reshape(flat_stats))
    return outs[0], outs[1], outs[2], outs[3].reshape(shape_stats), outs[4].reshape(shape_stats)
