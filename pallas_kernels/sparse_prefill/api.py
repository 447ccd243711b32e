"""Public entry of fused sparse prefill attention (same call as the reference)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_prefill.kernel import PrefillBlocks, prefill_attention


@functools.partial(jax.jit, static_argnames=("sink", "local", "scale", "blocks", "interpret"))
def sparse_prefill(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    q_lens: jax.Array,  # [B] int32 valid query rows
    kv_lens: jax.Array,  # [B] int32 valid keys (the queries are the last q_lens of them)
    streaming: jax.Array,  # [K] bool
    *,
    sink: int,
    local: int,
    scale: float | None = None,
    blocks: PrefillBlocks | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same result as `sparse_prefill_reference`; returns [B, T, N, H] in q's dtype."""
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"k {k.shape} and v {v.shape} must be [{b}, S, K, {h}] with K "
                         f"dividing N={n}")
    if q_lens.shape != (b,) or kv_lens.shape != (b,) or streaming.shape != (k.shape[2],):
        raise ValueError(f"q_lens {q_lens.shape}, kv_lens {kv_lens.shape} must be ({b},) and "
                         f"streaming {streaming.shape} ({k.shape[2]},)")
    blocks = blocks or PrefillBlocks()
    pad_t = -t % blocks.block_q
    pad_s = -k.shape[1] % blocks.block_k
    if pad_t:
        q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    if pad_s:
        k, v = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k, v))
    out = prefill_attention(q, k, v, q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32),
                            streaming.astype(jnp.int32), scale=h ** -0.5 if scale is None
                            else scale, sink=sink, local=local, blocks=blocks,
                            interpret=interpret)
    return out[:, :t]
