"""Residual add + RMSNorm fused: the Pallas (Triton) kernel. One program per row (a decode
step has B rows of D = 4096): it loads the row and its residual delta once, writes their sum
(the new residual stream) and the weighted norm. XLA runs the same as three kernels (add,
mean-square reduction, scale), each a launch on a decode step's critical path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _kernel(*refs, eps: float, add: bool):
    if add:  # x [D], delta [D], weight [D] -> sum [D], normed [D]
        x_ref, d_ref, w_ref, s_ref, o_ref = refs
    else:
        x_ref, w_ref, o_ref = refs
    x = x_ref[...]
    if add:
        x = (x.astype(jnp.float32) + d_ref[...].astype(jnp.float32)).astype(x.dtype)
        s_ref[...] = x
    x32 = x.astype(jnp.float32)
    mean_square = jnp.sum(x32 * x32) / x32.shape[0]
    normed = (x32 * jax.lax.rsqrt(mean_square + eps)).astype(x.dtype)
    o_ref[...] = (w_ref[...] * normed).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm_rows(x, delta, weight, *, eps: float, interpret: bool = False):
    """x: [R, D] (D a power of two); delta: [R, D] or None; weight: [D]. Returns (x + delta, or
    x when delta is None; the weighted norm [R, D])."""
    r, d = x.shape
    row = pl.BlockSpec((None, d), lambda i: (i, 0))
    norm = jax.ShapeDtypeStruct((r, d), jnp.result_type(weight.dtype, x.dtype))
    add = delta is not None
    outs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, add=add),
        grid=(r,),
        in_specs=[row] * (1 + add) + [pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[row] * (1 + add),
        out_shape=[jax.ShapeDtypeStruct((r, d), x.dtype)] * add + [norm],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(*((x, delta) if add else (x,)), weight)
    return (outs[0], outs[1]) if add else (x, outs[0])
