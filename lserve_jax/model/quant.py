"""FP8 weights (`ModelConfig.weight_dtype = "fp8"`): every linear layer's weight in float8 e4m3
with one f32 scale per output channel, and its input quantized per token to e4m3 on the fly, so
that XLA runs the GEMM on the 8-bit operands (cuBLASLt's FP8 kernels on Hopper) and never
materialises a bf16 copy of the weight.

A quantized weight is stored with its output axes first and its contraction axes last
(`[out..., in...]`, as cuBLASLt's FP8 GEMM wants both operands contiguous in the contraction),
beside `<name>_scale` `[out...]`. The embedding stays in the model's dtype (a gather reads one
row a token), and so does a tied output head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lserve_jax.config import ModelConfig

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
# parameter name -> how many leading axes of the bf16 weight are contracted
LINEAR = {"qkv": 1, "o": 2, "gate_up": 1, "down": 1, "lm_head": 1}


def quantize_weight(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
    """(codes [out..., in...] e4m3, scale [out...] f32) of a weight [in..., out...]."""
    w = jnp.moveaxis(w.astype(jnp.float32), tuple(range(n_in)), tuple(range(-n_in, 0)))
    in_axes = tuple(range(w.ndim - n_in, w.ndim))
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=in_axes), 1e-12) / FP8_MAX
    codes = jnp.clip(w / jnp.expand_dims(scale, in_axes), -FP8_MAX, FP8_MAX).astype(FP8)
    return codes, scale


def quantize_params(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """(config with weight_dtype "fp8", parameters with every linear weight quantized)."""
    if cfg.weight_dtype == "fp8":
        return cfg, params

    def walk(tree: dict) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value)
            elif name in LINEAR:
                out[name], out[f"{name}_scale"] = jax.jit(
                    quantize_weight, static_argnums=1)(value, LINEAR[name])
            else:
                out[name] = value
        return out

    return dataclasses.replace(cfg, weight_dtype="fp8"), walk(params)


def fp8_dot(x: jax.Array, codes: jax.Array, scale: jax.Array, n_in: int, out_dtype):
    """x [..., in...] times a quantized weight: x is scaled per token (its absmax over the
    contracted axes) to e4m3, the dot runs on the 8-bit operands with f32 accumulation, and
    both scales are applied to the result [..., out...]."""
    in_axes = tuple(range(x.ndim - n_in, x.ndim))
    xf = x.astype(jnp.float32)
    x_scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=in_axes, keepdims=True), 1e-12) / FP8_MAX
    xq = jnp.clip(xf / x_scale, -FP8_MAX, FP8_MAX).astype(FP8)
    n_out = codes.ndim - n_in
    dims = ((in_axes, tuple(range(n_out, codes.ndim))), ((), ()))
    y = jax.lax.dot_general(xq, codes, dims, preferred_element_type=jnp.float32)
    x_scale = x_scale.reshape(x.shape[:-n_in] + (1,) * n_out)
    return (y * x_scale * scale).astype(out_dtype)
