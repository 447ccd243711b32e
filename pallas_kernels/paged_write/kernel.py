"""Decode-time KV append fused with RoPE: one program per (row, KV head) reads the new token's
q/k/v projections, rotates the key and the KV head's query heads, writes the key and value in
place into the shared pool (aliased outputs; the caller donates the cache), quantized when the
pool is (`kv_quant`: codes plus, per token, a scale and zero point), updates the logical
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

from pallas_kernels import kv_quant
from pallas_kernels._compat import whole


def _append_kernel(
    # inputs
    qkv_ref,  # [B, N + 2K, H] this token's projections: N query, K key, K value heads
    cos_ref,  # [H/2] f32 rotation of this row's position
    sin_ref,  # [H/2] f32
    phys_ref,  # [B, K] int32 destination page (0: trash)
    slot_ref,  # [B] int32 token slot in the page
    layer_ref,  # [1] int32 the layer (a static format's scales are [L, B, K])
    k_pool_in,  # [P, Np, H or H/2] (aliased to k_pool): values, or codes of `kind`
    v_pool_in,  # (aliased to v_pool)
    k_scale_in,  # kv_quant scales of `kind` (aliased to k_scale; unused unquantized)
    v_scale_in,  # (aliased to v_scale)
    kmin_in,  # [P * R, H] (aliased to kmin)
    kmax_in,  # [P * R, H] (aliased to kmax)
    # outputs
    q_ref,  # [Gp, H] rotated query heads of this KV head; rows >= G zero
    k_pool,
    v_pool,
    k_scale,
    v_scale,
    kmin,  # [P * R, H]
    kmax,  # [P * R, H]
    *,
    logical_page: int,
    stats: bool,
    kind: str,
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
    # rounded to the model's dtype first, as a prefill's rotated keys are
    key = [x.astype(qkv_ref.dtype) for x in rotate(qkv_ref[b, n_q + kh, lo],
                                                   qkv_ref[b, n_q + kh, hi])]
    value = [qkv_ref[b, n_q + n_kv + kh, part] for part in (lo, hi)]
    for pool, scale_in, scale_out, x in ((k_pool, k_scale_in, k_scale, key),
                                         (v_pool, v_scale_in, v_scale, value)):
        _put(pool, scale_in, scale_out, page, slot, x, (b, layer_ref[0], kh), kind)
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


def _put(pool, scale_in, scale_out, page, slot, halves, where, kind: str):
    """Stores one token's channel halves [H/2] at (page, slot) in format `kind`."""
    b, layer, kh = where
    width = pool.shape[2] // 2
    parts = (pl.ds(0, width), pl.ds(width, width))
    if kind == "auto":
        codes = [x.astype(pool.dtype) for x in halves]
    elif kind in kv_quant.STATIC:
        scale = scale_in[layer, b, kh]
        codes = [kv_quant.quantize_static(x, scale, kind) for x in halves]
    else:
        codes, scale, zero = kv_quant.quantize_token_parts(list(halves), kind)
        scale_out[page, 0, slot] = scale
        scale_out[page, 1, slot] = zero
        if kind == "int4":
            pool[page, slot, :] = codes[0]
            return
    for part, x in zip(parts, codes):
        pool[page, slot, part] = x


@functools.partial(jax.jit, static_argnames=("q_rows", "logical_page", "stats", "interpret"))
def append_rotated(qkv, cos, sin, phys, slot, k_pool, v_pool, kmin, kmax, layer, *,
                   q_rows: int, logical_page: int, stats: bool, interpret: bool = False):
    """qkv: [B, N + 2K, H]; cos, sin: [B, H/2] f32; phys: [B, K]; slot: [B]; pools [P, Np, H]
    arrays or kv_quant.QuantizedPool; kmin/kmax [P', Np/Nl, H]; layer: [1] int32. Returns (q
    [B, K, q_rows, H] in qkv's dtype, k_pool, v_pool, kmin, kmax): the pools in place when
    the caller's jit donates them (otherwise XLA copies to honour the aliasing)."""
    b, kh = phys.shape
    h = qkv.shape[2]
    kind = kv_quant.pool_kind(k_pool)
    (k_codes, k_scale), (v_codes, v_scale) = (kv_quant.split_pool(p) for p in (k_pool, v_pool))
    shape_stats = kmin.shape
    flat_stats = (shape_stats[0] * shape_stats[1], h)
    angle = pl.BlockSpec((None, h // 2), lambda i, j: (i, 0))
    pools = (k_codes, v_codes, k_scale, v_scale)
    outs = pl.pallas_call(
        functools.partial(_append_kernel, logical_page=logical_page, stats=stats, kind=kind),
        grid=(b, kh),
        in_specs=[whole(qkv), angle, angle, whole(phys), whole(slot), whole(layer),
                  *map(whole, pools), whole(flat_stats), whole(flat_stats)],
        out_specs=[pl.BlockSpec((None, None, q_rows, h), lambda i, j: (i, j, 0, 0)),
                   *map(whole, pools), whole(flat_stats), whole(flat_stats)],
        out_shape=[jax.ShapeDtypeStruct((b, kh, q_rows, h), qkv.dtype),
                   *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in pools),
                   jax.ShapeDtypeStruct(flat_stats, kmin.dtype),
                   jax.ShapeDtypeStruct(flat_stats, kmax.dtype)],
        input_output_aliases={6: 1, 7: 2, 8: 3, 9: 4, 10: 5, 11: 6},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="kv_append",
    )(qkv, cos.astype(jnp.float32), sin.astype(jnp.float32), phys, slot, layer, *pools,
      kmin.reshape(flat_stats), kmax.reshape(flat_stats))
    q, k_codes, v_codes, k_scale, v_scale, kmin, kmax = outs
    return (q, _join(k_pool, k_codes, k_scale), _join(v_pool, v_codes, v_scale),
            kmin.reshape(shape_stats), kmax.reshape(shape_stats))


def _join(pool, codes, scale):
    if isinstance(pool, kv_quant.QuantizedPool):
        return kv_quant.QuantizedPool(codes, scale, pool.kind)
    return codes
