"""The engine's jitted device steps over fixed-size slot arrays (no shape depends on which
requests run, so requests coming and going never recompile).

- `install`: gives a cache row (slot) to a request: its page-table row, length 0.
- `prefill`: writes the next prompt tokens of up to P slots and returns their last logits.
- `decode`: runs every active slot a fixed number of steps, the page selector rerun on each
  R-th step (fixed at trace time), and returns the tokens.
The cache is donated to each and returned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lserve_jax.attention import AttentionMetadata, PagedAttention, Phase
from lserve_jax.cache.paged import KVCache
from lserve_jax.model.llama import Llama
from lserve_jax.sampling import sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """What the host tells a decode chunk about each slot ([B] arrays unless noted)."""

    last: jax.Array  # int32: the slot's newest token (the next step's input)
    count: jax.Array  # int32: tokens the request has generated (the next one's index)
    active: jax.Array  # bool: the slot decodes in this chunk
    max_tokens: jax.Array  # int32: the request ends when count reaches it
    stops: jax.Array  # [B, S] int32: stop token ids, -1 padded
    seeds: jax.Array  # int32: sampling seed
    temperature: jax.Array  # f32 (0: greedy)
    top_p: jax.Array  # f32
    top_k: jax.Array  # int32 (0: off)

    @classmethod
    def greedy(cls, batch: int) -> SlotState:
        """`batch` active greedy slots that never stop (benchmarks and lowering checks)."""
        return cls(last=jnp.zeros(batch, jnp.int32), count=jnp.ones(batch, jnp.int32),
                   active=jnp.ones(batch, bool), max_tokens=jnp.full(batch, 2**30, jnp.int32),
                   stops=jnp.full((batch, 1), -1, jnp.int32), seeds=jnp.zeros(batch, jnp.int32),
                   temperature=jnp.zeros(batch), top_p=jnp.ones(batch),
                   top_k=jnp.zeros(batch, jnp.int32))

    def sample(self, logits: jax.Array, index: jax.Array) -> jax.Array:
        return sample(logits, self.seeds, index, self.temperature, self.top_p, self.top_k)


@functools.partial(jax.jit, donate_argnums=(0,))
def install(cache: KVCache, slot: jax.Array, table: jax.Array) -> KVCache:
    """Cache row `slot` holds nothing and maps through `table` ([L, K, M] int32; all trash page
    frees the row). Its previous selection is forgotten."""
    return dataclasses.replace(
        cache, page_table=cache.page_table.at[slot].set(table),
        lengths=cache.lengths.at[slot].set(0), selected=cache.selected.at[:, slot].set(-1))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def prefill(model_cfg, attention: PagedAttention, stream_heads, phase: Phase, params,
            cache: KVCache, slots, tokens, new_lens, modes) -> tuple[jax.Array, KVCache]:
    """Writes tokens [P, T] into cache rows `slots` [P] int32 (a slot >= B is padding) at each
    row's length (row p's first new_lens[p] tokens are real) and returns the logits of each
    row's last written token ([P, V] f32; garbage for padding) with the cache. `phase` is
    PREFILL when every row starts its prompt, CHUNK otherwise; `stream_heads`: each layer's
    streaming KV heads (static)."""
    model = Llama(model_cfg, attention)
    view = cache.rows(slots)
    positions = view.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    meta = AttentionMetadata(new_lens=new_lens, modes=modes, step=jnp.zeros((), jnp.int32),
                             logits_at=jnp.maximum(new_lens - 1, 0), phase=phase,
                             stream_heads=stream_heads)
    logits, view = model.apply({"params": params}, tokens, positions, view, meta)
    return logits[:, 0], cache.merge_rows(slots, view)


@jax.jit
def first_tokens(state: SlotState, logits: jax.Array) -> jax.Array:
    """Each row's first generated token (index 0) from its prompt's last logits [P, V]."""
    return state.sample(logits, jnp.zeros_like(state.count))


def decode_step(model: Llama, params, cache: KVCache, state: SlotState, done: jax.Array,
                modes, refresh: bool | None = None
                ) -> tuple[KVCache, SlotState, jax.Array, jax.Array]:
    """One decode step of every slot not `done`: returns (cache, state with last/count
    advanced, done, the step's tokens [B] (-1 where done)). `refresh`: whether the page
    selector reruns (see `AttentionMetadata`)."""
    active = ~done
    meta = AttentionMetadata(new_lens=active.astype(jnp.int32), modes=modes,
                             step=jnp.zeros((), jnp.int32), phase=Phase.DECODE, refresh=refresh)
    logits, cache = model.apply({"params": params}, state.last[:, None], cache.lengths[:, None],
                                cache, meta)
    tok = state.sample(logits[:, 0], state.count)
    count = state.count + active
    stopped = jnp.any(tok[:, None] == state.stops, axis=-1)
    done = done | (active & stopped) | (count >= state.max_tokens)
    state = dataclasses.replace(state, last=jnp.where(active, tok, state.last), count=count)
    return cache, state, done, jnp.where(active, tok, -1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def decode(model_cfg, attention: PagedAttention, steps: int, params, cache: KVCache,
           state: SlotState, modes) -> tuple[jax.Array, jax.Array, KVCache]:
    """Up to `steps` decode steps (a multiple of R) of the active slots; stops early when every
    slot is done (a stop token, or max_tokens). With a reusable page selection one iteration
    is R steps: the first reruns the selector, the others reuse it, decided at trace time
    (deciding per step on the device takes a `lax.cond` per layer, which cost LServe's token
    10% on the H200). A slot joins at a chunk's first step, so its selector reruns at its own
    first step and every R-th after, as when it runs alone.
    Returns (tokens [B, steps] int32 (-1 where a slot did not decode), counts [B], cache)."""
    model = Llama(model_cfg, attention)
    sparsity = attention.sparsity
    r = sparsity.reuse_steps
    if steps % r:
        raise ValueError(f"steps={steps} must be a multiple of the reuse interval R={r}")
    b = state.last.shape[0]

    def step(i, carry, refresh=None):
        cache, state, done, out = carry
        cache, state, done, tok = decode_step(model, params, cache, state, done, modes, refresh)
        return cache, state, done, out.at[:, i].set(tok)

    def body(carry):
        group, inner = carry
        if not sparsity.dynamic:
            return group + 1, step(group, inner)
        inner = step(group * r, inner, refresh=True)
        inner = jax.lax.fori_loop(1, r, lambda j, c: step(group * r + j, c, refresh=False), inner)
        return group + 1, inner

    def cond(carry):
        group, (_, _, done, _) = carry
        return (group < steps // r) & ~jnp.all(done)

    out = jnp.full((b, steps), -1, jnp.int32)
    _, (cache, state, _, out) = jax.lax.while_loop(
        cond, body, (jnp.int32(0), (cache, state, ~state.active, out)))
    return out, state.count, cache
