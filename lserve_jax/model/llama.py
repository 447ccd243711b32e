"""Functional Flax Llama: embedding, RMSNorm, RoPE (plain and Llama-3 scaled), GQA, SwiGLU.

Call shape: `Llama(cfg, attention).apply({"params": params}, tokens, positions, cache, meta)`
returns `(logits, cache)`. Layers are unrolled with their own parameters (`layers_0`, ...), and
each hands its static index to attention with the whole cache: nothing is sliced out of a
stacked array per layer (a dynamic slice of stacked weights in a loop is a copy that triples
the bytes a decode step moves). Attention is the model's `attention` field, a static value
with `attend`, `norm` and `finish` (`lserve_jax.attention.PagedAttention` when serving). Axis
legend in the README.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax.attention import AttentionImpl, PagedAttention, example_inputs, rope_tables
from lserve_jax.config import ModelConfig
from lserve_jax.model.quant import FP8, LINEAR, fp8_dot, quantize_params

_init = nn.initializers.normal(0.02)


def linear(module: nn.Module, name: str, x: jax.Array, equation: str, shape: tuple[int, ...],
           cfg: ModelConfig, out_dtype=None) -> jax.Array:
    """x times the module's weight `name` of `shape` (contracted axes first, as `equation`
    says); FP8 weights (`cfg.weight_dtype`) run through `quant.fp8_dot`."""
    if cfg.weight_dtype != "fp8":
        w = module.param(name, _init, shape, cfg.dtype)
        return jnp.einsum(equation, x, w, preferred_element_type=out_dtype)
    n_in = LINEAR[name]
    out, contracted = shape[n_in:], shape[:n_in]
    codes = module.param(name, nn.initializers.zeros, out + contracted, FP8)
    scale = module.param(f"{name}_scale", nn.initializers.ones, out, jnp.float32)
    return fp8_dot(x, codes, scale, n_in, out_dtype or cfg.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[H/2] inverse frequencies, with Llama-3 scaling when configured (as HF computes them)."""
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    sc = cfg.rope_scaling
    if sc is None:
        return inv.astype(np.float32)
    low_wavelen = sc.original_max_position / sc.low_freq_factor
    high_wavelen = sc.original_max_position / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class RMSNorm(nn.Module):
    eps: float
    dtype: str
    attention: AttentionImpl

    @nn.compact
    def __call__(self, x: jax.Array, delta: jax.Array | None, meta) -> tuple[jax.Array, jax.Array]:
        """Adds the pending residual `delta` (None: none) to x and normalises the sum: returns
        (x + delta, weight * rms_norm(x + delta)), one kernel in decode (see attention)."""
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        return self.attention.norm(x, delta, weight, self.eps, meta)


class Attention(nn.Module):
    cfg: ModelConfig
    attention: AttentionImpl
    layer: int

    @nn.compact
    def __call__(self, x, rope, cache, meta):
        """rope: (cos, sin) [B, T, H/2] f32 of the tokens' positions (`rope_tables`): q and k
        are rotated at the seam, in decode inside the KV-append kernel."""
        c = self.cfg
        n, kh = c.n_heads, c.n_kv_heads
        # q, k and v heads side by side: one projection. Apart, a single jitted decode step ran
        # the narrow k/v projections as XLA reduce fusions (0.69 ms on the H200); the serving
        # loop was already free of them and kept its speed (4.95 vs 4.98 ms, README).
        qkv = linear(self, "qkv", x, "BTD,DMH->BTMH", (c.dim, n + 2 * kh, c.head_dim), c)
        out, cache = self.attention.attend(self, qkv, rope, cache, meta, self.layer)
        return linear(self, "o", out, "BTNH,NHD->BTD", (n, c.head_dim, c.dim), c), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        # gate and up side by side: one GEMM reads both (in a decode step it is a single
        # weight-streaming launch, like the q/k/v projection)
        h = linear(self, "gate_up", x, "BTD,DSF->BTSF", (c.dim, 2, c.ffn_dim), c)
        return linear(self, "down", jax.nn.silu(h[:, :, 0]) * h[:, :, 1], "BTF,FD->BTD",
                      (c.ffn_dim, c.dim), c)


class Block(nn.Module):
    cfg: ModelConfig
    attention: AttentionImpl
    layer: int

    @nn.compact
    def __call__(self, x, delta, cache, rope, meta):
        """The residual stream is x + delta: the previous block's MLP output arrives as delta
        and is added by this block's first norm (an add and a norm are one kernel in decode).
        Returns (x, delta, cache) in the same form."""
        c = self.cfg
        with jax.named_scope(f"layer_{self.layer}/attention"):
            x, h = RMSNorm(c.norm_eps, c.dtype, self.attention, name="attn_norm")(x, delta, meta)
            h, cache = Attention(c, self.attention, self.layer, name="attn")(h, rope, cache, meta)
        with jax.named_scope(f"layer_{self.layer}/mlp"):
            x, h = RMSNorm(c.norm_eps, c.dtype, self.attention, name="mlp_norm")(x, h, meta)
            return x, MLP(c, name="mlp")(h), cache


class Llama(nn.Module):
    cfg: ModelConfig
    attention: AttentionImpl = PagedAttention()  # static: attend / norm / finish (see module doc)

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache, meta):
        """tokens, positions: [B, T] int32; cache and meta as `attention` takes them (serving:
        the KV cache and an `AttentionMetadata`). Returns logits [B, T, V] (f32) and the cache
        as `attention.finish` leaves it (serving: lengths advanced by `meta.new_lens`). With
        `meta.logits_at` ([B] int32) only those rows' logits are computed ([B, 1, V]). The final
        normed hidden states are sown as `intermediates/hidden`."""
        c = self.cfg
        embed = self.param("embed", _init, (c.vocab_size, c.dim), c.dtype)
        x, delta = jnp.take(embed, tokens, axis=0), None
        rope = rope_tables(positions, rope_inv_freq(c))
        for layer in range(c.n_layers):
            x, delta, cache = Block(c, self.attention, layer, name=f"layers_{layer}")(
                x, delta, cache, rope, meta)
        if getattr(meta, "logits_at", None) is not None:
            x, delta = (jnp.take_along_axis(y, meta.logits_at[:, None, None], axis=1)
                        for y in (x, delta))
        _, x = RMSNorm(c.norm_eps, c.dtype, self.attention, name="norm")(x, delta, meta)
        self.sow("intermediates", "hidden", x)
        if c.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, embed, preferred_element_type=jnp.float32)
        else:
            logits = linear(self, "lm_head", x, "BTD,DV->BTV", (c.dim, c.vocab_size), c,
                            jnp.float32)
        return logits, self.attention.finish(cache, meta)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random parameters (normal(0.02) weights, unit norms) without running the model; with
    FP8 weights, the same weights quantized."""
    if cfg.weight_dtype == "fp8":
        plain = dataclasses.replace(cfg, weight_dtype="auto")
        return quantize_params(plain, init_params(plain, key))[1]
    model = Llama(cfg)
    shapes = jax.eval_shape(lambda: model.init(
        key, *example_inputs(cfg, model.attention.sparsity)))["params"]
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))

    def make(path, leaf, k):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(leaf.shape, leaf.dtype)
        return (0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)

    return jax.tree.unflatten(treedef, [make(p, leaf, k) for (p, leaf), k in zip(leaves, keys)])
