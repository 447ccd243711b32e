"""Residual add + RMSNorm in plain jnp: the oracle of the fused kernel, and the model's norm
wherever the kernel does not run."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def add_rms_norm_reference(x: jax.Array, delta: jax.Array | None, weight: jax.Array, *,
                           eps: float) -> tuple[jax.Array, jax.Array]:
    """x, delta: [..., D] (delta None: nothing to add); weight: [D]. Returns (s, weight *
    rms_norm(s)) with s = x + delta in x's dtype, the norm computed in f32 and rounded to x's
    dtype before the weight multiplies it (as HF Llama does)."""
    s = x if delta is None else (x.astype(jnp.float32) + delta.astype(jnp.float32)).astype(x.dtype)
    s32 = s.astype(jnp.float32)
    normed = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
    return s, weight * normed.astype(x.dtype)
