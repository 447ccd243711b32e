"""Public entry of the fused residual add + RMSNorm (same call and result as the reference)."""

from __future__ import annotations

import functools

import jax

from pallas_kernels._compat import is_power_of_two
from pallas_kernels.rms_norm.kernel import add_rms_norm_rows
from pallas_kernels.rms_norm.reference import add_rms_norm_reference


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x: jax.Array, delta: jax.Array | None, weight: jax.Array, *, eps: float,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x, delta: [..., D] (delta None: nothing to add); weight: [D]. Returns (x + delta, weighted
    norm) like `add_rms_norm_reference`, with the f32 mean square summed in another order. A
    width D that is not a power of two (a Triton block) runs the reference."""
    d = x.shape[-1]
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta {delta.shape} must have x's shape {x.shape}")
    if weight.shape != (d,):
        raise ValueError(f"weight {weight.shape} must be ({d},)")
    if not is_power_of_two(d):
        return add_rms_norm_reference(x, delta, weight, eps=eps)
    rows = x.reshape(-1, d)
    s, o = add_rms_norm_rows(rows, None if delta is None else delta.reshape(-1, d), weight,
                             eps=eps, interpret=interpret)
    return s.reshape(x.shape), o.reshape(x.shape)
