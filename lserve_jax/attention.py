"""The one seam between the model and the kernels: RoPE, cache writes, prefill and decode
attention, and the residual add + norm that a decode step runs as one kernel.

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
from lserve_jax.sparsity import pages as selector
from lserve_jax.sparsity.policy import DENSE, SELECT, STREAM, head_modes, list_width
from lserve_jax.train_attention import selected_train, streaming_train
from pallas_kernels.page_select.api import select_pages
from pallas_kernels.page_select.reference import page_scores_reference, select_pages_reference
from pallas_kernels.paged_write.api import append_decode, write_tokens
from pallas_kernels.paged_write.reference import rotate, write_tokens_reference
from pallas_kernels.rms_norm.api import add_rms_norm
from pallas_kernels.rms_norm.reference import add_rms_norm_reference
from pallas_kernels.sparse_decode import reference as decode_ref
from pallas_kernels.sparse_decode.api import query_rows, sparse_decode
from pallas_kernels.sparse_prefill.api import sparse_prefill
from pallas_kernels.sparse_prefill.reference import sparse_prefill_reference
from pallas_kernels.sparse_prefill.windowed import windowed_prefill

assert (DENSE, SELECT, STREAM) == (decode_ref.DENSE, decode_ref.SELECT, decode_ref.STREAM)
PALLAS = ("pallas", "pallas_interpret")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["new_lens", "modes", "step", "logits_at"],
                   meta_fields=["phase", "stream_heads", "prefill_kernel", "refresh"])
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-call metadata. Static fields: `phase`, "prefill" (the cache holds nothing of these
    rows yet), "chunk" (a later chunk of a prefill: its queries also attend to the tokens
    already cached) or "decode" (one new token per row); `stream_heads`, each layer's
    streaming KV heads (the mode table as Python data, needed only by the composite prefill,
    which hands the other heads to cuDNN); `prefill_kernel` (see RunConfig); `refresh`, whether
    this decode step reruns the page selector (None: decided on the device from `step`)."""

    new_lens: jax.Array  # [B] int32: new tokens per row in this call (0: row inactive)
    modes: jax.Array  # [L, K] int8: DENSE / SELECT / STREAM per (layer, KV head)
    step: jax.Array  # [] int32: decode steps taken (the selector reruns when step % R == 0)
    logits_at: jax.Array | None = None  # [B] int32: the only row whose logits are wanted
    phase: str = "prefill"
    stream_heads: tuple[tuple[int, ...], ...] = ()
    prefill_kernel: str = "fused"
    refresh: bool | None = None


def rope_tables(positions: jax.Array, inv_freq) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, H/2] f32 of each token's position (inv_freq: [H/2]); one pair serves
    every layer."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def split_heads(qkv: jax.Array, rope: tuple[jax.Array, jax.Array],
                n_kv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The projections [B, T, N + 2K, H] as q [B, T, N, H], k, v [B, T, K, H], q and k rotated
    (f32, rounded once: the fused decode kernel computes the same)."""
    n = qkv.shape[2] - 2 * n_kv
    return (rotate(qkv[:, :, :n], *rope), rotate(qkv[:, :, n:n + n_kv], *rope),
            qkv[:, :, n + n_kv:])


def attend(qkv: jax.Array, rope: tuple[jax.Array, jax.Array], cache: KVCache, layer: int,
           meta: AttentionMetadata, sparsity: SparsityConfig,
           backend: Backend) -> tuple[jax.Array, KVCache]:
    """qkv: [B, T, N + 2K, H] projections before RoPE; rope: (cos, sin) [B, T, H/2] f32
    (`rope_tables`). Rotates q and k, writes k/v into the cache, then attends. Returns
    ([B, T, N, H], cache). A decode step on the Pallas backends rotates, writes and pads the
    queries in one kernel."""
    streaming = meta.modes[layer] == STREAM  # [K]
    if meta.phase == "decode" and backend in PALLAS:
        with jax.named_scope("decode_attention"):
            return _decode_fused(qkv, rope, cache, layer, meta, streaming, sparsity, backend)
    q, k, v = split_heads(qkv, rope, cache.page_table.shape[2])
    with jax.named_scope("kv_write"):
        cache = _write(cache, layer, k, v, meta.new_lens, streaming, sparsity, backend,
                       aligned=meta.phase != "decode")
    if meta.phase == "prefill":
        with jax.named_scope("prefill_attention"):
            if backend == "pallas" and meta.prefill_kernel != "fused":
                return composite_prefill(q, k, v, meta.new_lens, meta.stream_heads[layer],
                                         sparsity, meta.prefill_kernel == "windowed"), cache
            if backend == "cudnn":
                _require_dense(sparsity, backend)
                return cudnn_causal(q, k, v, meta.new_lens), cache
            lens = meta.new_lens
            return _prefill(q, k, v, lens, lens, streaming, sparsity, backend), cache
    if meta.phase == "chunk":
        with jax.named_scope("chunk_attention"):
            keys, values = gather_layer(cache, layer)  # every cached token, this chunk included
            kv_lens = cache.lengths + meta.new_lens
            return _prefill(q, keys, values, meta.new_lens, kv_lens, streaming, sparsity,
                            backend), cache
    with jax.named_scope("decode_attention"):
        return _decode(q, cache, layer, meta, sparsity, backend)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainMetadata:
    """Metadata of a cache-free forward over whole sequences (training, distillation)."""

    gates: jax.Array | None = None  # [L, K] f32 in [0, 1]: DuoAttention gates, or None (causal)
    sink: int = dataclasses.field(default=128, metadata={"static": True})
    local: int = dataclasses.field(default=8192, metadata={"static": True})
    # (page_size, logical_page_size, budget_pages): the queries at select_at ([B, T'] int32
    # positions, >= T pads) attend on the full side to the pages LServe's decode would select
    # (`selected_train`) instead of every earlier key
    select: tuple[int, int, int] | None = dataclasses.field(default=None,
                                                            metadata={"static": True})
    select_at: jax.Array | None = None
    # (page_size, logical_page_size, budget_pages): every layer sows `kept_mass`, the share of
    # each head's dense attention at select_at that those pages would keep (`selected_mass`)
    concentrate: tuple[int, int, int] | None = dataclasses.field(default=None,
                                                                 metadata={"static": True})


def attend_train(q: jax.Array, k: jax.Array, v: jax.Array, layer: int,
                 meta: TrainMetadata) -> jax.Array:
    """Causal attention over whole sequences (q: [B, T, N, H]; k, v: [B, T, K, H]; no cache).
    With gates, each KV head's output is g * causal + (1 - g) * streaming (sink + local keys):
    DuoAttention's training mix. On the GPU, cuDNN flash attention serves the causal part
    (bf16/f16); the streaming part is `streaming_train`, banded, so any T fits. With
    meta.select, the queries at meta.select_at attend to selected pages on the full side."""
    fast = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    full = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        implementation="cudnn" if fast else "xla")
    if meta.select:
        chosen = selected_train(q, k, v, *meta.select, at=meta.select_at)
        rows = jnp.arange(q.shape[0])[:, None]
        full = full.at[rows, meta.select_at].set(chosen.astype(full.dtype), mode="drop")
    if meta.gates is None:
        return full
    streaming = streaming_train(q, k, v, meta.sink, meta.local)
    gate = jnp.repeat(meta.gates[layer], q.shape[2] // k.shape[2])[:, None]  # [N, 1]
    return (gate * full + (1 - gate) * streaming).astype(q.dtype)


def residual_norm(x: jax.Array, delta: jax.Array | None, weight: jax.Array, eps: float,
                  meta, backend: Backend) -> tuple[jax.Array, jax.Array]:
    """(x + delta, weight * rms_norm(x + delta)) over the last axis (delta None: x alone). A
    decode step on the Pallas backends runs it as one kernel; elsewhere it is plain jnp."""
    if backend in PALLAS and getattr(meta, "phase", None) == "decode":
        return add_rms_norm(x, delta, weight, eps=eps, interpret=backend == "pallas_interpret")
    return add_rms_norm_reference(x, delta, weight, eps=eps)


def advance(cache: KVCache, meta: AttentionMetadata) -> KVCache:
    return dataclasses.replace(cache, lengths=cache.lengths + meta.new_lens)


def _kernels(backend: str):
    """The (write, select, decode) implementations of a backend: references, or Pallas kernels
    compiled for the GPU or interpreted on the CPU (multi-token writes are XLA scatters)."""
    if backend in PALLAS:
        interpret = backend == "pallas_interpret"
        return (write_tokens, functools.partial(select_pages, interpret=interpret),
                functools.partial(sparse_decode, interpret=interpret))
    return write_tokens_reference, _select_reference, _decode_reference


def _decode_reference(q, *args, groups, **kwargs):
    return decode_ref.sparse_decode_reference(q[:, :, :groups], *args, **kwargs)


def _select_reference(q, kmin, kmax, table, lengths, modes, *, layer, k, width, page_size,
                      group_reduce, keep_sink_page):
    scores = page_scores_reference(q, kmin, kmax, table, lengths, modes, layer=layer,
                                   page_size=page_size, group_reduce=group_reduce)
    return select_pages_reference(scores, lengths, modes[layer], k=k, width=width,
                                  page_size=page_size, keep_sink_page=keep_sink_page)


def _write(cache, layer, k, v, new_lens, streaming, sparsity, backend, aligned) -> KVCache:
    """`aligned`: every writing row starts on a page boundary (prefill, and chunks, which are
    page multiples), so the kernels may reduce statistics per page instead of per token."""
    write = _kernels(backend)[0]
    if aligned and backend in PALLAS:
        write = functools.partial(write, aligned=True)
    k_pool, v_pool, kmin, kmax = write(
        cache.k, cache.v, cache.kmin, cache.kmax, cache.page_table[:, layer], cache.lengths,
        k, v, new_lens, streaming, sink_pages=sparsity.sink_pages,
        ring_pages=sparsity.ring_pages, stats=sparsity.dynamic)
    return dataclasses.replace(cache, k=k_pool, v=v_pool, kmin=kmin, kmax=kmax)


def cudnn_causal(q, k, v, lens):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lens,
                                        key_value_seq_lengths=lens, implementation="cudnn")


def _prefill(q, k, v, q_lens, kv_lens, streaming, sparsity, backend) -> jax.Array:
    """The queries are the last q_lens of kv_lens keys. On the GPU (backends pallas and cudnn)
    the fused kernel runs: cuDNN's causal mask cannot offset queries past the keys' start."""
    fn = sparse_prefill_reference
    if backend != "reference":
        fn = functools.partial(sparse_prefill, interpret=backend == "pallas_interpret")
    return fn(q, k, v, q_lens, kv_lens, streaming, sink=sparsity.prefill_sink,
              local=sparsity.prefill_local)


def composite_prefill(q, k, v, lens, stream_kv: tuple[int, ...], sparsity,
                      windowed: bool = False) -> jax.Array:
    """Dense heads through cuDNN, streaming heads through the Pallas kernel (or, `windowed`,
    through cuDNN's sliding window plus a sink call merged by log-sum-exp); the two head groups
    are gathered from the in-flight q/k/v (the cache is not touched)."""
    kh = k.shape[2]
    g = q.shape[2] // kh
    dense_kv = tuple(x for x in range(kh) if x not in stream_kv)

    def streaming(q, k, v):
        if windowed:
            return windowed_prefill(q, k, v, lens, sink=sparsity.prefill_sink,
                                    local=sparsity.prefill_local)
        return sparse_prefill(q, k, v, lens, lens, jnp.ones((k.shape[2],), bool),
                              sink=sparsity.prefill_sink, local=sparsity.prefill_local)

    if not dense_kv or not stream_kv:
        return streaming(q, k, v) if stream_kv else cudnn_causal(q, k, v, lens)

    def heads(kv):
        return jnp.asarray([x * g + i for x in kv for i in range(g)])

    out_d = cudnn_causal(q[:, :, heads(dense_kv)], k[:, :, dense_kv], v[:, :, dense_kv], lens)
    out_s = streaming(q[:, :, heads(stream_kv)], k[:, :, stream_kv], v[:, :, stream_kv])
    order = jnp.argsort(jnp.concatenate([heads(dense_kv), heads(stream_kv)]))
    return jnp.concatenate([out_d, out_s], axis=2)[:, :, order]


def _decode(q, cache, layer, meta, sparsity, backend):
    """The reference and cuDNN decode (the cache already holds this token)."""
    b, _, n, h = q.shape
    if backend == "cudnn":
        _require_dense(sparsity, backend)
        keys, values = gather_layer(cache, layer)
        out = jax.nn.dot_product_attention(q, keys, values, implementation="cudnn",
                                           key_value_seq_lengths=cache.lengths + meta.new_lens)
        return out, cache
    kh = cache.page_table.shape[2]
    out, cache = _attend_pages(q.reshape(b, kh, n // kh, h), n // kh, cache, layer, meta,
                               sparsity, backend)
    return out.reshape(b, 1, n, h), cache


def _decode_fused(qkv, rope, cache, layer, meta, streaming, sparsity, backend):
    """A decode step on the Pallas backends: one kernel rotates q and k, appends k and v and
    writes the queries padded to the decode kernel's rows; then selection (when due) and the
    sparse decode kernel."""
    b, _, m, h = qkv.shape
    kh = cache.page_table.shape[2]
    g = (m - 2 * kh) // kh
    q, k_pool, v_pool, kmin, kmax = append_decode(
        cache.k, cache.v, cache.kmin, cache.kmax, cache.page_table[:, layer], cache.lengths,
        qkv[:, 0], rope[0][:, 0], rope[1][:, 0], meta.new_lens, streaming,
        q_rows=query_rows(g), sink_pages=sparsity.sink_pages, ring_pages=sparsity.ring_pages,
        stats=sparsity.dynamic, interpret=backend == "pallas_interpret")
    cache = dataclasses.replace(cache, k=k_pool, v=v_pool, kmin=kmin, kmax=kmax)
    out, cache = _attend_pages(q, g, cache, layer, meta, sparsity, backend)
    return out.reshape(b, 1, g * kh, h), cache


def _attend_pages(qg, groups, cache, layer, meta, sparsity, backend):
    """qg: [B, K, G or more, H] (rows past `groups` are zero padding). Reselects this layer's
    pages when due, then attends to each head's pages. Returns ([B, K, G, H], cache)."""
    lengths = cache.lengths + meta.new_lens
    _, select, attend_pages = _kernels(backend)
    if sparsity.dynamic:
        def fresh():
            return select(qg[:, :, :groups], cache.kmin, cache.kmax, cache.page_table, lengths,
                          meta.modes, layer=layer, k=sparsity.budget_pages - 1,
                          width=cache.selected.shape[-1],
                          page_size=sparsity.page_size,
                          group_reduce=selector.group_reduce(sparsity),
                          keep_sink_page=sparsity.keep_sink_page)
        if meta.refresh is not False:  # False: this step reuses the selection as it stands
            chosen = selector.reuse_or_select(meta.step, cache.selected[layer], fresh, sparsity,
                                              meta.refresh)
            cache = dataclasses.replace(cache, selected=cache.selected.at[layer].set(chosen))
    out = attend_pages(qg, cache.k, cache.v, cache.page_table, cache.selected, lengths,
                       meta.modes, layer=layer, sink=sparsity.decode_sink,
                       local=sparsity.decode_local, budget_pages=sparsity.budget_pages,
                       max_listed=list_width(sparsity, cache.max_pages), groups=groups)
    return out, cache


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
