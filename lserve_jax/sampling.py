"""Token sampling: greedy, temperature and nucleus (top-p), all traced (no recompiles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _nucleus(logits: jax.Array, key: jax.Array, temperature: jax.Array,
             top_p: jax.Array) -> jax.Array:
    scaled = logits / temperature
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits: [B, V] f32 -> [B] int32. temperature == 0 is greedy (no sort is run); otherwise
    softmax(logits / temperature) restricted to the smallest set of most likely tokens whose
    probability reaches top_p (always at least one token)."""
    return jax.lax.cond(
        temperature > 0, _nucleus,
        lambda logits, *_: jnp.argmax(logits, axis=-1).astype(jnp.int32),
        logits, key, temperature, top_p)
