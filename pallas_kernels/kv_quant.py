"""Quantized KV pages: the formats, and the quantize / dequantize math that the writes, the
decode kernel and every reference share (plain jnp on tiles, so kernels call it too).

A pool is a plain `[P, Np, H]` array (unquantized, the model's dtype) or a `QuantizedPool`:
- `int8` (symmetric, one scale per (row, layer) for all KV heads: LServe's per-tensor KV8)
  and `fp8` (e4m3, one scale per (row, layer, KV head)): codes `[P, Np, H]`, scales
  `[L, B, K]` f32. A row's scales are calibrated from its prompt when its first tokens are
  written (absmax / qmax over the written tokens); later tokens are clipped to them.
- `int8_token` and `int4` (asymmetric, a scale and a zero point per (token, KV head):
  LServe's fine-grained KV8 / KV4): codes uint8 `[P, Np, H]`, or `[P, Np, H/2]` for int4 with
  channel i in the low nibble and channel i + H/2 in the high one; scales `[P, 2, Np]` f32
  (row 0 the scale, row 1 the zero point = the token's minimum).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

KV_FORMATS = ("auto", "int8", "fp8", "int8_token", "int4")
STATIC = ("int8", "fp8")  # a scale per (row, layer[, KV head]), set from the prompt
PER_TOKEN = ("int8_token", "int4")  # a scale and zero point per (token, KV head)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_LEVELS = {"int8": 127.0, "fp8": FP8_MAX, "int8_token": 255.0, "int4": 15.0}
_TINY = 1e-8  # floor of a scale (an all-zero head would otherwise divide by zero)


def code_dtype(kind: str):
    return {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}.get(kind, jnp.uint8)


def token_bytes(kind: str, head_dim: int, itemsize: int) -> int:
    """Pool bytes of one token's key (or value) of one KV head: its codes, and its scale and
    zero point (per-token formats; a static format's scales are per row, not per token)."""
    if kind == "auto":
        return head_dim * itemsize
    codes = head_dim // 2 if kind == "int4" else head_dim
    return codes + (8 if kind in PER_TOKEN else 0)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale"],
                   meta_fields=["kind"])
@dataclasses.dataclass(frozen=True)
class QuantizedPool:
    """Quantized key or value pages of every (layer, KV head). `shape` is the logical
    `[P, Np, H]` (int4 codes are half as wide)."""

    codes: jax.Array
    scale: jax.Array
    kind: str

    @property
    def shape(self) -> tuple[int, int, int]:
        p, n_p, w = self.codes.shape
        return p, n_p, 2 * w if self.kind == "int4" else w


def empty_pool(kind: str, num_pages: int, page_size: int, head_dim: int, *, n_layers: int,
               batch: int, n_kv: int, dtype, fill: float = 0.0):
    """A pool in format `kind` ('auto': a plain array of `dtype`). `fill` poisons it (NaN:
    float codes and every scale; integer codes take their largest value)."""
    if kind == "auto":
        return jnp.full((num_pages, page_size, head_dim), fill, dtype)
    if kind not in KV_FORMATS:
        raise ValueError(f"kv format {kind!r} is unknown: choose one of {KV_FORMATS}")
    width = head_dim // 2 if kind == "int4" else head_dim
    dt = code_dtype(kind)
    code = fill if jnp.issubdtype(dt, jnp.floating) or fill == 0 else jnp.iinfo(dt).max
    codes = jnp.full((num_pages, page_size, width), code, dt)
    shape = (n_layers, batch, n_kv) if kind in STATIC else (num_pages, 2, page_size)
    return QuantizedPool(codes, jnp.full(shape, fill if fill else 1.0, jnp.float32), kind)


# ---- static scales (int8, fp8) ----

def calibrate(scale: jax.Array, kind: str, x: jax.Array, lengths: jax.Array,
              new_lens: jax.Array, head_axis: str | None = None) -> jax.Array:
    """One layer's scales [B, K] after a write of x [B, T, K, H]: rows whose first tokens
    these are (lengths 0, new_lens > 0) take absmax / qmax of their written tokens (int8: over
    every KV head of the layer, and across the devices of mesh axis `head_axis` when the heads
    are split over it); the others keep theirs."""
    valid = (jnp.arange(x.shape[1]) < new_lens[:, None])[:, :, None, None]
    amax = jnp.max(jnp.where(valid, jnp.abs(x.astype(jnp.float32)), 0.0), axis=(1, 3))
    if kind == "int8":
        layer_max = jnp.max(amax, axis=1, keepdims=True)
        if head_axis is not None:
            layer_max = jax.lax.pmax(layer_max, head_axis)
        amax = jnp.broadcast_to(layer_max, amax.shape)
    fresh = (lengths == 0) & (new_lens > 0)
    return jnp.where(fresh[:, None], jnp.maximum(amax, _TINY) / _LEVELS[kind], scale)


def quantize_static(x: jax.Array, scale: jax.Array, kind: str) -> jax.Array:
    """Codes of x under `scale` (broadcast against x), clipped to the format's range."""
    y = jnp.clip(x.astype(jnp.float32) / scale, -_LEVELS[kind], _LEVELS[kind])
    return (_round(y) if kind == "int8" else y).astype(code_dtype(kind))


def _round(y: jax.Array) -> jax.Array:
    """Round half up (Triton has no round-half-even; kernels and references share this)."""
    return jnp.floor(y + 0.5)


# ---- per-token scales (int8_token, int4) ----

def quantize_token(x: jax.Array, kind: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(codes, scale, zero) of x [..., H] with a scale and zero point per vector: codes
    round((x - min) / scale) in [0, levels], int4 packed (channel i low, i + H/2 high)."""
    half = x.shape[-1] // 2
    codes, scale, zero = quantize_token_parts([x[..., :half], x[..., half:]], kind)
    return (codes[0] if len(codes) == 1 else jnp.concatenate(codes, axis=-1)), scale, zero


def quantize_token_parts(parts: list[jax.Array], kind: str):
    """`quantize_token` of a vector given as channel halves [..., H/2] (as kernels hold it):
    (codes as [packed [..., H/2]] for int4, else one array per half; scale; zero)."""
    parts = [p.astype(jnp.float32) for p in parts]
    lo = functools.reduce(jnp.minimum, [jnp.min(p, axis=-1) for p in parts])
    hi = functools.reduce(jnp.maximum, [jnp.max(p, axis=-1) for p in parts])
    scale = jnp.maximum(hi - lo, _TINY) / _LEVELS[kind]
    codes = [jnp.clip(_round((p - lo[..., None]) / scale[..., None]), 0, _LEVELS[kind])
             .astype(jnp.uint8) for p in parts]
    if kind == "int4":
        codes = [codes[0] | (codes[1] << 4)]
    return codes, scale, lo


def unpack(codes: jax.Array, kind: str) -> list[jax.Array]:
    """The stored channels as f32 parts: [all H] or, int4, [channels < H/2, the rest]."""
    if kind == "int4":
        return [(codes & 15).astype(jnp.float32), (codes >> 4).astype(jnp.float32)]
    return [codes.astype(jnp.float32)]


def dequantize(codes: jax.Array, scale: jax.Array, zero: jax.Array | None, kind: str):
    """f32 values [..., H] of codes [..., H or H/2]: codes * scale (+ zero per token); scale
    and zero broadcast against codes without the channel axis."""
    parts = [c * scale[..., None] + (0.0 if zero is None else zero[..., None])
             for c in unpack(codes, kind)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


# ---- whole pools (writes and references) ----

def store(pool, phys: jax.Array, slot: jax.Array, x: jax.Array, layer: int = 0):
    """pool with x [B, T, K, H] written at (phys [B, T, K], slot [B, T, 1]) (out-of-range
    pages dropped); a static format's scales must already be calibrated."""
    if not isinstance(pool, QuantizedPool):
        return pool.at[phys, slot].set(x.astype(pool.dtype), mode="drop")
    kind = pool.kind
    if kind in STATIC:
        codes = quantize_static(x, pool.scale[layer][:, None, :, None], kind)
        return dataclasses.replace(pool, codes=pool.codes.at[phys, slot].set(codes, mode="drop"))
    codes, scale, zero = quantize_token(x, kind)
    slot = jnp.broadcast_to(slot, phys.shape)
    scales = pool.scale.at[phys, 0, slot].set(scale, mode="drop")
    return QuantizedPool(pool.codes.at[phys, slot].set(codes, mode="drop"),
                         scales.at[phys, 1, slot].set(zero, mode="drop"), kind)


def read_pages(pool, phys: jax.Array, layer: int = 0) -> jax.Array:
    """Pages phys [B, K, ...] (row b, KV head k's pages: a static format's scales are
    looked up by position) of the pool as f32 [B, K, ..., Np, H], dequantized."""
    if not isinstance(pool, QuantizedPool):
        return pool[phys].astype(jnp.float32)
    codes = pool.codes[phys]
    if pool.kind in STATIC:
        s = pool.scale[layer].reshape(pool.scale.shape[1:] + (1,) * (phys.ndim - 2 + 1))
        return dequantize(codes, s, None, pool.kind)
    scales = pool.scale[phys]  # [..., 2, Np]
    return dequantize(codes, scales[..., 0, :], scales[..., 1, :], pool.kind)


def pool_kind(pool) -> str:
    return pool.kind if isinstance(pool, QuantizedPool) else "auto"


def split_pool(pool) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of a pool for a kernel; an unquantized pool gets a placeholder scale."""
    if isinstance(pool, QuantizedPool):
        return pool.codes, pool.scale
    return pool, jnp.zeros((1, 1, 1), jnp.float32)
