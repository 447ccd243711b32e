"""How much of a head's dense attention the pages a policy selects keep (selection recall).

At each answer token of a teacher-forced prompt (the tokens a decode generates), every query
head of a SELECT head gets its dense attention probabilities over the context. `selected` is
the mass on the keys LServe's decode attends to (the query's own page and the pages with the
best Quest bounds, `train_attention.dense_view`; the testbed's concentration loss trains the
same share), `oracle` the most any choice of as many earlier pages could keep (the pages with
the most mass). A selector near the oracle with both low means the head's attention is
spread: no choice of pages reproduces it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax.attention import rope_tables, split_heads
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.model.llama import Llama, rope_inv_freq
from lserve_jax.sparsity.policy import SELECT
from lserve_jax.lab.train_attention import TrainAttention, TrainMetadata, dense_view


def coverage(cfg: ModelConfig, params, sequence: np.ndarray, queries: np.ndarray,
             sparsity: SparsityConfig, modes: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """{(layer, kv head): [2, G, len(queries)]} for every SELECT head: the (selected, oracle)
    attention mass each query head keeps at the query positions `queries` of `sequence`."""
    masses = np.asarray(_masses(cfg, sparsity, params, jnp.asarray(sequence, jnp.int32),
                                jnp.asarray(queries, jnp.int32)))  # [L, 2, K, G, T]
    return {(layer, kh): masses[layer, :, kh] for layer in range(cfg.n_layers)
            for kh in range(cfg.n_kv_heads) if modes[layer, kh] == SELECT}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _masses(cfg: ModelConfig, sparsity: SparsityConfig, params, sequence: jax.Array,
            queries: jax.Array) -> jax.Array:
    """[L, 2, K, G, T] (T = len(queries)): (selected, oracle) mass of every head, as
    `coverage` reports it."""
    n_p = sparsity.page_size
    t = sequence.shape[0]
    positions = jnp.arange(t)[None]
    _, state = Llama(cfg, TrainAttention()).apply(
        {"params": params}, sequence[None], positions, None, TrainMetadata(),
        capture_intermediates=True)
    rope = rope_tables(positions, rope_inv_freq(cfg))
    pos = queries[None]
    shape = (n_p, sparsity.logical_page_size, sparsity.budget_pages)
    out = []
    for layer in range(cfg.n_layers):
        normed = state["intermediates"][f"layers_{layer}"]["attn_norm"]["__call__"][0][1]
        qkv = jnp.einsum("BTD,DMH->BTMH", normed, params[f"layers_{layer}"]["attn"]["qkv"])
        q, k, _ = split_heads(qkv, rope, cfg.n_kv_heads)
        probs, chosen = dense_view(q.astype(jnp.float32), k.astype(jnp.float32), *shape, at=pos)
        selected = jnp.sum(jnp.where(chosen, probs, 0.0), axis=-1)
        mass = probs.reshape(*probs.shape[:-1], -1, n_p).sum(-1)  # [1, K, G, T, M]
        page = jnp.arange(mass.shape[-1])
        current = (pos // n_p)[..., None, None, :, None]
        best = jax.lax.top_k(jnp.where(page < current, mass, 0.0),
                             min(shape[2] - 1, mass.shape[-1]))[0]
        oracle = best.sum(-1) + jnp.sum(jnp.where(page == current, mass, 0.0), axis=-1)
        out.append(jnp.stack([selected[0], oracle[0]]))
    return jnp.stack(out)
