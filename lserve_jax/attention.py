"""The one seam between the model and the kernels: cache writes, prefill and decode attention.

Backends (`RunConfig.backend`): `reference` (plain jnp, any device: the oracle), `cudnn`
(`jax.nn.dot_product_attention(implementation="cudnn")`, GPU, dense policy only), `pallas`
(Pallas Triton kernels, GPU) and `pallas_interpret` (the same kernels interpreted on CPU).
Every policy runs through the same calls: what differs is the mode table in the metadata.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lserve_jax.cache.paged import KVCache, empty_cache, gather_layer
from lserve_jax.config import Backend, ModelConfig, SparsityConfig
from lserve_jax.sparsity import pages as page_lists
from lserve_jax.sparsity.policy import SELECT, STREAM, head_modes, list_width
from pallas_kernels.page_select.api import page_scores, select_pages
from pallas_kernels.page_select.reference import page_scores_reference
from pallas_kernels.paged_write.api import write_tokens
from pallas_kernels.paged_write.reference import write_tokens_reference
from pallas_kernels.sparse_decode.api import sparse_decode
from pallas_kernels.sparse_decode.reference import sparse_decode_reference
from pallas_kernels.sparse_prefill.reference import sparse_prefill_reference


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["new_lens", "modes", "step", "logits_at"],
                   meta_fields=["phase"])
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-call metadata. `phase` is static: "prefill" (the cache holds nothing of these rows
    yet) or "decode" (one new token per row)."""

    new_lens: jax.Array  # [B] int32: new tokens per row in this call (0: row inactive)
    modes: jax.Array  # [L, K] int8: DENSE / SELECT / STREAM per (layer, KV head)
    step: jax.Array  # [] int32: decode steps taken (the selector reruns when step % R == 0)
    logits_at: jax.Array | None = None  # [B] int32: the only row whose logits are wanted
    phase: str = "prefill"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, layer: jax.Array,
           meta: AttentionMetadata, sparsity: SparsityConfig,
           backend: Backend) -> tuple[jax.Array, KVCache]:
    """q: [B, T, N, H]; k, v: [B, T, K, H] (post-RoPE). Writes k/v into the cache, then attends.
    Returns ([B, T, N, H], cache)."""
    streaming = meta.modes[layer] == STREAM  # [K]
    with jax.named_scope("kv_write"):
        cache = _write(cache, layer, k, v, meta.new_lens, streaming, sparsity, backend)
    if meta.phase == "prefill":
        with jax.named_scope("prefill_attention"):
            return _prefill(q, k, v, meta.new_lens, streaming, sparsity, backend), cache
    with jax.named_scope("decode_attention"):
        return _decode(q, cache, layer, meta, streaming, sparsity, backend)


def advance(cache: KVCache, meta: AttentionMetadata) -> KVCache:
    return dataclasses.replace(cache, lengths=cache.lengths + meta.new_lens)


def _kernels(backend: str):
    """Which implementation of each op a backend uses: references, or Pallas kernels (compiled
    for the GPU, or interpreted on the CPU)."""
    if backend in ("pallas", "pallas_interpret"):
        interpret = backend == "pallas_interpret"
        return (functools.partial(write_tokens, interpret=interpret),
                functools.partial(page_scores, interpret=interpret),
                functools.partial(sparse_decode, interpret=interpret))
    return write_tokens_reference, page_scores_reference, sparse_decode_reference


def _write(cache, layer, k, v, new_lens, streaming, sparsity, backend) -> KVCache:
    write = _kernels(backend)[0]
    k_pool, v_pool, kmin, kmax = write(
        cache.k, cache.v, cache.kmin, cache.kmax, cache.page_table[:, layer], cache.lengths,
        k, v, new_lens, streaming, sink_pages=sparsity.sink_pages,
        ring_pages=sparsity.ring_pages, stats=sparsity.dynamic)
    return dataclasses.replace(cache, k=k_pool, v=v_pool, kmin=kmin, kmax=kmax)


def _prefill(q, k, v, new_lens, streaming, sparsity, backend) -> jax.Array:
    if backend == "cudnn":
        _require_dense(sparsity, backend)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=new_lens,
            key_value_seq_lengths=new_lens, implementation="cudnn")
    return sparse_prefill_reference(q, k, v, new_lens, new_lens, streaming,
                                    sink=sparsity.prefill_sink, local=sparsity.prefill_local)


def _decode(q, cache, layer, meta, streaming, sparsity, backend):
    b, _, n, h = q.shape
    lengths = cache.lengths + meta.new_lens
    if backend == "cudnn":
        _require_dense(sparsity, backend)
        keys, values = gather_layer(cache, layer)
        out = jax.nn.dot_product_attention(q, keys, values, key_value_seq_lengths=lengths,
                                           implementation="cudnn")
        return out, cache
    kh = cache.page_table.shape[2]
    qg = q.reshape(b, kh, n // kh, h)
    table = cache.page_table[:, layer]
    selected = cache.selected[layer]
    width = list_width(sparsity, cache.max_pages)
    pages, counts, selected = page_lists.decode_lists(
        qg, table, selected, meta.modes[layer], lengths, meta.step, sparsity, width,
        functools.partial(_select, cache, sparsity, backend, selected.shape[-1]))
    attend_pages = _kernels(backend)[2]
    out = attend_pages(qg, cache.k, cache.v, table, pages, counts, lengths, streaming,
                       shared_lists=meta.modes[layer] != SELECT, sink=sparsity.decode_sink,
                       local=sparsity.decode_local)
    cache = dataclasses.replace(cache, selected=cache.selected.at[layer].set(selected))
    return out.reshape(b, 1, n, h), cache


def _select(cache: KVCache, sparsity: SparsityConfig, backend: str, k: int, q, table,
            n_pages) -> jax.Array:
    scores = _kernels(backend)[1](q, cache.kmin, cache.kmax, table,
                                  group_reduce=page_lists.group_reduce(sparsity))
    return select_pages(scores, n_pages, k=k, keep_sink_page=sparsity.keep_sink_page)


def _require_dense(sparsity: SparsityConfig, backend: str) -> None:
    if not sparsity.is_dense:
        raise ValueError(f"backend={backend!r} computes dense attention only, but "
                         f"policy={sparsity.policy!r}: use backend 'reference' or 'pallas'")


def example_inputs(cfg: ModelConfig, sparsity: SparsityConfig):
    """Smallest valid (tokens, positions, cache, meta) for tracing the model (e.g. `init`)."""
    cache = empty_cache(cfg, sparsity, num_pages=2, batch=1, max_pages=1)
    modes = jnp.asarray(head_modes(cfg, dataclasses.replace(sparsity, policy="dense")))
    meta = AttentionMetadata(new_lens=jnp.ones((1,), jnp.int32), modes=modes,
                             step=jnp.zeros((), jnp.int32))
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, cache, meta

