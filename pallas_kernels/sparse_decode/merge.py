"""Merge of the decode kernel's partials: the Pallas (Triton) kernel and its plain-jnp
reference.

Every (list, split) partial of a KV head is one term of the same log-sum-exp, so the output is
sum_s 2^(m_s - top) o_s / sum_s 2^(m_s - top) l_s. XLA ran this as four or five fusions a layer
(max, exp, two sums, the divide and the cast); the kernel runs it as one. One program per (row
b, KV head k, slice of H) walks the S partials `chunk` at a time (vectorised over the chunk,
online across chunks) and reads only the first `rows` query rows: the decode kernel never
writes the padding rows past G. The last chunk is shifted back to end at S (no slice runs
past the array) and masks the entries the previous chunk already merged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._compat import NEG_INF, next_power_of_two

def merge_partials_reference(o, m, l, groups: int, dtype) -> jax.Array:
    """o: [B, K, S, Gp, H] f32; m, l: [B, K, S, Gp] (log2 units). Returns [B, K, G, H]."""
    o, m, l = o[..., :groups, :], m[..., :groups], l[..., :groups]
    top = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp2(m - top)  # [B, K, S, G]
    total = jnp.sum(weight * l, axis=2)
    out = jnp.sum(weight[..., None] * o, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(dtype)


def _merge_kernel(o_ref, m_ref, l_ref, out_ref, *, chunk: int):
    # o_ref [S, rows, hb] f32; m_ref, l_ref [S, rows] f32; out_ref [rows, hb]
    n = o_ref.shape[0]
    rows, hb = out_ref.shape

    def step(c, carry):
        acc, top, total = carry
        start = jnp.minimum(c * chunk, n - chunk)
        fresh = start + jax.lax.broadcasted_iota(jnp.int32, (chunk, rows), 0) >= c * chunk
        m, l = m_ref[pl.ds(start, chunk), :], l_ref[pl.ds(start, chunk), :]
        o = o_ref[pl.ds(start, chunk), :, :]
        new = jnp.maximum(top, jnp.max(m, axis=0))  # entries merged before are <= top already
        alpha = jnp.exp2(top - new)
        w = jnp.where(fresh, jnp.exp2(m - new[None, :]), 0.0)  # [chunk, rows]
        acc = alpha[:, None] * acc + jnp.sum(w[:, :, None] * o, axis=0)
        return acc, new, alpha * total + jnp.sum(w * l, axis=0)

    carry = (jnp.zeros((rows, hb), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    acc, _, total = jax.lax.fori_loop(0, pl.cdiv(n, chunk), step, carry)
    out_ref[...] = (acc / jnp.where(total > 0, total, 1.0)[:, None]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("groups", "dtype", "chunk", "block_h",
                                             "interpret"))
def merge_partials(o, m, l, *, groups: int, dtype, chunk: int = 16, block_h: int = 32,
                   interpret: bool = False) -> jax.Array:
    """Same result as `merge_partials_reference` (o: [B, K, S, Gp, H] f32, rows past `groups`
    never read; m, l: [B, K, S, Gp]); returns [B, K, G, H] in `dtype`. One program per (row,
    KV head, `block_h` channels) merges `chunk` partials a loop step."""
    b, kh, s, gp, h = o.shape
    rows = next_power_of_two(groups)
    hb = block_h if h % block_h == 0 else h
    chunk = min(chunk, 1 << (s.bit_length() - 1))  # a power of two <= S
    out = pl.pallas_call(
        functools.partial(_merge_kernel, chunk=chunk),
        grid=(b, kh, h // hb),
        in_specs=[pl.BlockSpec((None, None, s, rows, hb), lambda i, j, x: (i, j, 0, 0, x)),
                  pl.BlockSpec((None, None, s, rows), lambda i, j, x: (i, j, 0, 0)),
                  pl.BlockSpec((None, None, s, rows), lambda i, j, x: (i, j, 0, 0))],
        out_specs=pl.BlockSpec((None, None, rows, hb), lambda i, j, x: (i, j, 0, x)),
        out_shape=jax.ShapeDtypeStruct((b, kh, rows, h), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="merge_partials",
    )(o, m, l)
    return out if rows == groups else out[:, :, :groups]
