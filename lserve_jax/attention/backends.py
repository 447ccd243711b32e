"""The backend registry: what each `Backend` runs at each stage of attention.

`kernels(backend, tuning)` returns one `Kernels` object; the serving attention calls its methods
and never compares backend names. The reference backend runs the plain-jnp oracles of
`pallas_kernels` on any device; `cudnn` runs dense attention through
`jax.nn.dot_product_attention(implementation="cudnn")`; `pallas` and `pallas_interpret` run the
Pallas kernels compiled for the GPU or interpreted on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lserve_jax.cache.paged import KVCache, gather_layer
from lserve_jax.config import Backend, PrefillPath, SparsityConfig
from lserve_jax.sparsity import pages as selector
from lserve_jax.sparsity.policy import list_width
from pallas_kernels.page_select.api import select_pages
from pallas_kernels.page_select.kernel import SelectTuning
from pallas_kernels.page_select.reference import page_scores_reference, select_pages_reference
from pallas_kernels.paged_write.api import append_decode, write_tokens
from pallas_kernels.paged_write.reference import write_tokens_reference
from pallas_kernels.rms_norm.api import add_rms_norm
from pallas_kernels.rms_norm.reference import add_rms_norm_reference
from pallas_kernels.sparse_decode.api import sparse_decode
from pallas_kernels.sparse_decode.kernel import DecodeTuning
from pallas_kernels.sparse_decode.reference import sparse_decode_reference
from pallas_kernels.sparse_prefill.api import sparse_prefill
from pallas_kernels.sparse_prefill.reference import sparse_prefill_reference
from pallas_kernels.sparse_prefill.windowed import windowed_prefill


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """How the Pallas kernels tile their work (defaults measured on the H200)."""

    decode: DecodeTuning = DecodeTuning()
    select: SelectTuning = SelectTuning()


class Kernels:
    """The reference backend: plain jnp, any device. Subclasses replace what they run
    differently. Shapes: q [B, T, N, H], k/v [B, T, K, H]; page-attention queries qg
    [B, K, G or query_rows(G), H] (rows past `groups` are zero)."""

    fused_decode = False  # decode steps rotate, append and pad the queries in one kernel
    dense_only = False  # computes dense attention only (the policy must be `dense`)

    def __init__(self, tuning: KernelTuning):
        self.tuning = tuning

    def write(self, cache: KVCache, layer: int, k, v, new_lens, streaming,
              sparsity: SparsityConfig, aligned: bool, head_axis: str | None = None) -> KVCache:
        """Writes k/v at each row's length; `aligned`: every writing row starts on a page
        boundary (prefill, chunks), so statistics may be reduced per page; `head_axis`: the
        mesh axis the KV heads are split over (int8 calibrates one scale across them)."""
        del aligned
        return _write(functools.partial(write_tokens_reference, head_axis=head_axis), cache,
                      layer, k, v, new_lens, streaming, sparsity)

    def prefill(self, q, k, v, lens, stream_heads: tuple[int, ...] | None, streaming,
                sparsity: SparsityConfig, path: PrefillPath):
        """A whole prompt's attention (keys = the prompt). `stream_heads`: the layer's
        streaming KV heads as Python data (None: not given; the split paths need it)."""
        del stream_heads, path
        return self.chunk(q, k, v, lens, lens, streaming, sparsity)

    def chunk(self, q, keys, values, q_lens, kv_lens, streaming, sparsity: SparsityConfig):
        """The queries are the last q_lens of kv_lens keys (a later chunk of a prompt)."""
        return sparse_prefill_reference(q, keys, values, q_lens, kv_lens, streaming,
                                        sink=sparsity.prefill_sink, local=sparsity.prefill_local)

    def select(self, qg, cache: KVCache, lengths, modes, layer: int,
               sparsity: SparsityConfig):
        """[B, K, Gs, W] pages each retrieval head selects (qg: the G real query rows)."""
        scores = page_scores_reference(qg, cache.kmin, cache.kmax, cache.page_table, lengths,
                                       modes, layer=layer, page_size=sparsity.page_size,
                                       group_reduce=selector.group_reduce(sparsity))
        return select_pages_reference(scores, lengths, modes[layer],
                                      width=cache.selected.shape[-1],
                                      page_size=sparsity.page_size,
                                      **selector.select_kwargs(sparsity, qg.shape[3], qg.shape[2]))

    def decode(self, qg, groups: int, cache: KVCache, lengths, modes, layer: int,
               sparsity: SparsityConfig):
        """[B, K, G, H]: each head's attention over its page list (the cache holds the token)."""
        return sparse_decode_reference(qg[:, :, :groups], *_decode_args(cache, lengths, modes),
                                       **_decode_kwargs(layer, sparsity, cache))

    def norm(self, x, delta, weight, eps: float, decode: bool):
        """(x + delta, weight * rms_norm(x + delta)); delta None: x alone."""
        del decode
        return add_rms_norm_reference(x, delta, weight, eps=eps)

    def append(self, cache: KVCache, layer: int, qkv, rope, new_lens, streaming,
               sparsity: SparsityConfig, q_rows: int):
        """The fused decode write (backends with `fused_decode`)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused decode append")


class Cudnn(Kernels):
    """Dense attention through cuDNN (GPU): prompts causal, decode over the gathered pages;
    a later chunk of a prompt runs our Pallas kernel (cuDNN's causal mask cannot offset the
    queries past the keys' start)."""

    dense_only = True

    def prefill(self, q, k, v, lens, stream_heads, streaming, sparsity, path):
        return cudnn_causal(q, k, v, lens)

    def chunk(self, q, keys, values, q_lens, kv_lens, streaming, sparsity):
        return sparse_prefill(q, keys, values, q_lens, kv_lens, streaming,
                              sink=sparsity.prefill_sink, local=sparsity.prefill_local)

    def decode(self, qg, groups, cache, lengths, modes, layer, sparsity):
        b, kh, _, h = qg.shape
        keys, values = gather_layer(cache, layer)
        q = qg[:, :, :groups].reshape(b, 1, kh * groups, h)
        out = jax.nn.dot_product_attention(q, keys, values, implementation="cudnn",
                                           key_value_seq_lengths=lengths)
        return out.reshape(b, kh, groups, h)


class Pallas(Kernels):
    """The Pallas Triton kernels, compiled (`interpret=False`, GPU) or interpreted (CPU).
    Multi-token writes are XLA scatters; a decode step's write is one fused kernel."""

    fused_decode = True

    def __init__(self, tuning: KernelTuning, interpret: bool):
        super().__init__(tuning)
        self.interpret = interpret

    def write(self, cache, layer, k, v, new_lens, streaming, sparsity, aligned, head_axis=None):
        return _write(functools.partial(write_tokens, aligned=aligned, head_axis=head_axis),
                      cache, layer, k, v, new_lens, streaming, sparsity)

    def prefill(self, q, k, v, lens, stream_heads, streaming, sparsity, path):
        if self.interpret or path is PrefillPath.fused:
            return self.chunk(q, k, v, lens, lens, streaming, sparsity)
        if stream_heads is None:
            raise ValueError(f"prefill path {path.value!r} splits the heads by mode and needs "
                             "AttentionMetadata.stream_heads (each layer's streaming KV heads)")
        return composite_prefill(q, k, v, lens, stream_heads, sparsity,
                                 windowed=path is PrefillPath.windowed)

    def chunk(self, q, keys, values, q_lens, kv_lens, streaming, sparsity):
        return sparse_prefill(q, keys, values, q_lens, kv_lens, streaming,
                              sink=sparsity.prefill_sink, local=sparsity.prefill_local,
                              interpret=self.interpret)

    def select(self, qg, cache, lengths, modes, layer, sparsity):
        return select_pages(qg, cache.kmin, cache.kmax, cache.page_table, lengths, modes,
                            layer=layer, width=cache.selected.shape[-1],
                            page_size=sparsity.page_size,
                            group_reduce=selector.group_reduce(sparsity),
                            tuning=self.tuning.select, interpret=self.interpret,
                            **selector.select_kwargs(sparsity, qg.shape[3], qg.shape[2]))

    def decode(self, qg, groups, cache, lengths, modes, layer, sparsity):
        return sparse_decode(qg, *_decode_args(cache, lengths, modes),
                             **_decode_kwargs(layer, sparsity, cache), groups=groups,
                             tuning=self.tuning.decode, interpret=self.interpret)

    def norm(self, x, delta, weight, eps, decode):
        if not decode:
            return add_rms_norm_reference(x, delta, weight, eps=eps)
        return add_rms_norm(x, delta, weight, eps=eps, interpret=self.interpret)

    def append(self, cache, layer, qkv, rope, new_lens, streaming, sparsity, q_rows):
        """Rotates q and k, appends k and v (and page statistics) and returns the queries
        [B, K, q_rows, H] padded for the decode kernel, with the cache."""
        q, k_pool, v_pool, kmin, kmax = append_decode(
            cache.k, cache.v, cache.kmin, cache.kmax, cache.page_table[:, layer], cache.lengths,
            qkv[:, 0], rope[0][:, 0], rope[1][:, 0], new_lens, streaming, q_rows=q_rows,
            sink_pages=sparsity.sink_pages, ring_pages=sparsity.ring_pages,
            stats=sparsity.dynamic, layer=layer, interpret=self.interpret)
        return q, dataclasses.replace(cache, k=k_pool, v=v_pool, kmin=kmin, kmax=kmax)


_REGISTRY = {
    Backend.reference: Kernels,
    Backend.cudnn: Cudnn,
    Backend.pallas: functools.partial(Pallas, interpret=False),
    Backend.pallas_interpret: functools.partial(Pallas, interpret=True),
}


@functools.lru_cache(maxsize=None)
def kernels(backend: Backend, tuning: KernelTuning = KernelTuning()) -> Kernels:
    """The kernels of `backend` (one object per (backend, tuning))."""
    return _REGISTRY[Backend(backend)](tuning)


def _write(write, cache, layer, k, v, new_lens, streaming, sparsity) -> KVCache:
    k_pool, v_pool, kmin, kmax = write(
        cache.k, cache.v, cache.kmin, cache.kmax, cache.page_table[:, layer], cache.lengths,
        k, v, new_lens, streaming, sink_pages=sparsity.sink_pages,
        ring_pages=sparsity.ring_pages, stats=sparsity.dynamic, layer=layer)
    return dataclasses.replace(cache, k=k_pool, v=v_pool, kmin=kmin, kmax=kmax)


def _decode_args(cache: KVCache, lengths, modes) -> tuple:
    return cache.k, cache.v, cache.page_table, cache.selected, lengths, modes


def _decode_kwargs(layer: int, sparsity: SparsityConfig, cache: KVCache) -> dict:
    return {"layer": layer, "sink": sparsity.decode_sink, "local": sparsity.decode_local,
            "budget_pages": sparsity.budget_pages,
            "max_listed": list_width(sparsity, cache.max_pages)}


def cudnn_causal(q, k, v, lens):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lens,
                                        key_value_seq_lengths=lens, implementation="cudnn")


def composite_prefill(q, k, v, lens, stream_kv: tuple[int, ...], sparsity: SparsityConfig,
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
