"""Per-request sampling: `SamplingParams` (vLLM's names) and the traced sampler.

Every row of a batch carries its own temperature, top-p, top-k and seed. A token's key is the
request's seed folded with the token's index in its request (`token_keys`), so a request's
sampled tokens depend on its seed and its own logits only, never on the other requests of its
batch or on when it was admitted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SEED_LIMIT = 2**31  # seeds travel to the device as int32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request generates. `temperature` 0 is greedy (vLLM's default is 1.0: pass it
    when you want sampling); `seed` None takes the engine's seed; `stop` strings need a
    tokenizer and end the text before them; the tokenizer's end-of-sequence token stops the
    request unless `ignore_eos`."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int)) else
                               tuple(value or ()))
        checks = [
            ("max_tokens", _int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _real(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_p", _real(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", _int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0: off)"),
            ("seed", self.seed is None or _int(self.seed) and 0 <= self.seed < SEED_LIMIT,
             f"None or an integer in [0, {SEED_LIMIT})"),
            ("stop_token_ids", all(_int(t) and t >= 0 for t in self.stop_token_ids),
             "token ids (integers >= 0)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: "
                                 f"it must be {want}")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def token_keys(seeds: jax.Array, index: jax.Array) -> jax.Array:
    """[B] keys: each row's seed ([B] int32) folded with its token index ([B] int32)."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, index)


def _filtered_draw(logits: jax.Array, key: jax.Array, temperature: jax.Array,
                   top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """One row: logits [V] -> int32, from softmax(logits / temperature) restricted to the
    top_k most likely tokens (0: all) and to the smallest set of most likely tokens whose
    probability reaches top_p (always at least one token)."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    probs = jax.nn.softmax(sorted_logits)
    before = jnp.cumsum(probs) - probs  # mass of strictly more likely tokens
    rank = jnp.arange(logits.shape[0])
    keep = (before < top_p) & ((top_k == 0) | (rank < top_k))
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    return order[jax.random.categorical(key, sorted_logits)].astype(jnp.int32)


def sample(logits: jax.Array, seeds: jax.Array, index: jax.Array, temperature: jax.Array,
           top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """logits [B, V] f32; per row: seed, token index, temperature, top_p, top_k ([B] each)
    -> [B] int32. Rows with temperature 0 take the argmax; when every row does, no key is
    derived and nothing is sorted."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        keys = token_keys(seeds, index)
        drawn = jax.vmap(_filtered_draw)(logits, keys, temperature, top_p, top_k)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
