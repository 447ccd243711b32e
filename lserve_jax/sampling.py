"""Token sampling: greedy, temperature and nucleus (top-p), all traced (no recompiles).

Each row draws with its own key, `token_keys(base, index)`: the run's base key folded with the
token's index in its request, so a request's sampled tokens depend on its seed and its own
logits only, never on the other requests of its batch or on the wave it runs in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_keys(base: jax.Array, index: jax.Array) -> jax.Array:
    """[B] keys: `base` (a key) folded with each row's token index ([B] int32)."""
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)


def _nucleus(logits: jax.Array, key: jax.Array, temperature: jax.Array,
             top_p: jax.Array) -> jax.Array:
    """One row: logits [V] -> int32."""
    scaled = logits / temperature
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    probs = jax.nn.softmax(sorted_logits)
    before = jnp.cumsum(probs) - probs  # mass of strictly more likely tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    return order[jax.random.categorical(key, sorted_logits)].astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, index: jax.Array, temperature: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits: [B, V] f32; key: the run's base key; index: [B] int32, each row's token index
    -> [B] int32. temperature == 0 is greedy (no key is derived, no sort is run); otherwise
    row b draws with `token_keys(key, index)[b]` from softmax(logits / temperature) restricted
    to the smallest set of most likely tokens whose probability reaches top_p (always at least
    one token)."""
    def draw():
        keys = token_keys(key, index)
        return jax.vmap(_nucleus, in_axes=(0, 0, None, None))(logits, keys, temperature, top_p)

    return jax.lax.cond(temperature > 0, draw,
                        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
