"""Streaming heads' prefill without a kernel of ours: cuDNN's sliding window for the local part
and a second, tiny cuDNN call for the sink, merged by their log-sum-exps.

A streaming query at position p sees keys s <= p with s < sink or s >= p - local
(`sparse_prefill_reference`). The window call covers s in [p - local, p]. The sink call covers
the sink keys the window has left, s < min(sink, p - local): it runs the queries from position
local + 1 on against the first `sink` keys under a top-left causal mask, so that its query i
(position i + local + 1) sees keys s <= i. `implementation="xla"` runs the same math in plain
jnp (f32 statistics; CPU and tests); "cudnn" needs a GPU and bf16/f16 inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # f32 statistics: see below


def attention_lse(q, k, v, q_lens, kv_lens, *, window: int | None, scale: float,
                  implementation: str) -> tuple[jax.Array, jax.Array]:
    """Top-left causal attention (query i sees keys j <= i, and j >= i - window when given),
    rows past q_lens / keys past kv_lens masked. Returns (out [B, T, N, H] in q's dtype, lse
    [B, T, N] f32). Rows that see no key have an arbitrary lse: the caller masks them."""
    if implementation == "cudnn":
        # jax.nn.dot_product_attention rounds its residual to q's dtype (bf16: up to 0.03 absolute
        # error in a log-sum-exp of ~10); the merge needs the f32 statistics cuDNN computes.
        out, stats = cudnn_fa.dot_product_attention(
            q, k, v, q_seqlen=q_lens, kv_seqlen=kv_lens, scale=scale,
            mask_type=cudnn_fa.MaskType.PADDING_CAUSAL, return_residual=True,
            sliding_window_length=None if window is None else window + 1)[:2]
        return out, stats.transpose(0, 2, 1)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    i, j = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    seen = (j <= i) if window is None else (j <= i) & (j >= i - window)
    seen = seen[None] & (i < q_lens[:, None, None]) & (j < kv_lens[:, None, None])  # [B, T, S]
    qg = q.reshape(b, t, kh, n // kh, h).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->btkgs", qg, k.astype(jnp.float32), precision="highest")
    logits = jnp.where(seen[:, :, None, None], logits * scale, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    values = jnp.where((j[0] < kv_lens[:, None])[..., None, None], v, 0).astype(jnp.float32)
    out = jnp.einsum("btkgs,bskh->btkgh", p, values, precision="highest")
    return out.reshape(b, t, n, h).astype(q.dtype), lse.reshape(b, t, n)


@functools.partial(jax.jit, static_argnames=("sink", "local", "scale", "implementation"))
def windowed_prefill(
    q: jax.Array,  # [B, T, N, H]: every head streaming
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    lens: jax.Array,  # [B] int32 valid tokens (queries and keys: a plain prefill)
    *,
    sink: int,
    local: int,
    scale: float | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """Same result as `sparse_prefill_reference` with every head streaming and q_lens ==
    kv_lens; returns [B, T, N, H] in q's dtype, padded rows zero."""
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"k {k.shape} and v {v.shape} must be [{b}, {t}, K, {h}] with K "
                         f"dividing N={n}")
    if lens.shape != (b,):
        raise ValueError(f"lens {lens.shape} must be ({b},)")
    scale = h ** -0.5 if scale is None else scale
    lens = lens.astype(jnp.int32)
    kw = dict(scale=scale, implementation=implementation)
    valid = jnp.arange(t)[None, :] < lens[:, None]  # [B, T]
    out, lse = attention_lse(q, k, v, lens, lens, window=local, **kw)
    shift = local + 1  # the first query position that may see a sink key outside the window
    if sink == 0 or t <= shift:
        return jnp.where(valid[..., None, None], out, 0)
    o_s, lse_s = attention_lse(q[:, shift:], k[:, :sink], v[:, :sink], jnp.maximum(lens - shift, 0),
                               jnp.clip(lens, 1, sink), window=None, **kw)
    pad = ((0, 0), (shift, 0), (0, 0))
    sees_sink = (valid & (jnp.arange(t)[None, :] >= shift))[..., None]  # [B, T, 1]
    lse_s = jnp.where(sees_sink, jnp.pad(lse_s, pad), -jnp.inf)
    total = jnp.logaddexp(lse, lse_s)
    total = jnp.where(jnp.isfinite(total), total, 0.0)
    o_s = jnp.where(sees_sink[..., None], jnp.pad(o_s, pad + ((0, 0),)), 0)
    merged = (jnp.exp(lse - total)[..., None] * out.astype(jnp.float32)
              + jnp.exp(lse_s - total)[..., None] * o_s.astype(jnp.float32))
    return jnp.where(valid[..., None, None], merged, 0).astype(q.dtype)
