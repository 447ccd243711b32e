"""Plain-jnp reference for sparse prefill attention (dense + streaming heads, causal, GQA).

The queries are the last `q_lens[b]` of the `kv_lens[b]` keys of row b: query t sits at position
kv_lens - q_lens + t (plain prefill: q_lens == kv_lens; a later chunk: q_lens < kv_lens). A
dense head sees every key s <= its position; a streaming head only s < sink or s >= pos - local.
Computed in f32 at highest precision; rounds once, to q's dtype. Padded query rows return zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prefill_visible(t: int, s: int, q_lens: jax.Array, kv_lens: jax.Array, streaming: jax.Array,
                    *, sink: int, local: int) -> jax.Array:
    """[B, K, T, S] bool: which keys each query row sees."""
    qpos = (kv_lens - q_lens)[:, None] + jnp.arange(t)[None, :]  # [B, T]
    kpos = jnp.arange(s)
    causal = (kpos[None, None, :] <= qpos[:, :, None]) & (
        jnp.arange(t)[None, :, None] < q_lens[:, None, None])  # [B, T, S]
    window = (kpos[None, None, :] < sink) | (kpos[None, None, :] >= qpos[:, :, None] - local)
    return causal[:, None] & (~streaming[None, :, None, None] | window[:, None])


def sparse_prefill_reference(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    q_lens: jax.Array,  # [B] int32: valid query rows
    kv_lens: jax.Array,  # [B] int32: valid keys (the queries are the last q_lens of them)
    streaming: jax.Array,  # [K] bool
    *,
    sink: int,
    local: int,
    scale: float | None = None,
) -> jax.Array:
    """Returns [B, T, N, H] in q's dtype."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = h ** -0.5 if scale is None else scale
    visible = prefill_visible(t, s, q_lens, kv_lens, streaming, sink=sink, local=local)
    qg = q.reshape(b, t, kh, n // kh, h).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision="highest")
    logits = jnp.where(visible[:, :, None], logits * scale, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    values = jnp.where((jnp.arange(s)[None, :] < kv_lens[:, None])[..., None, None], v, 0)
    out = jnp.einsum("bkgts,bskh->btkgh", p, values.astype(jnp.float32), precision="highest")
    denom = jnp.maximum(jnp.sum(p, axis=-1), 1e-30).transpose(0, 3, 1, 2)[..., None]
    return (out / denom).reshape(b, t, n, h).astype(q.dtype)
