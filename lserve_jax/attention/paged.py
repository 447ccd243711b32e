"""The serving attention: RoPE, cache writes, prefill and decode attention over the paged
cache, and the residual add + norm that a decode step runs as one kernel.

`PagedAttention` is a static (hashable) value the model holds; every policy runs through the
same calls, and what differs is the mode table in the metadata. The backend's kernels come from
the registry (`backends.kernels`), chosen once.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from lserve_jax.attention.backends import KernelTuning, Kernels, kernels
from lserve_jax.cache.paged import KVCache, cache_specs, empty_cache, gather_layer
from lserve_jax.config import Backend, ModelConfig, PrefillPath, SparsityConfig
from lserve_jax.parallel import DP, TP
from lserve_jax.sparsity import pages as selector
from lserve_jax.sparsity.policy import head_modes
from pallas_kernels.layout import STREAM, rotate
from pallas_kernels.sparse_decode.api import query_rows


class Phase(enum.Enum):
    PREFILL = "prefill"  # the cache holds nothing of these rows yet
    CHUNK = "chunk"  # a later chunk of a prefill: its queries also attend to the cached tokens
    DECODE = "decode"  # one new token per row


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["new_lens", "modes", "step", "logits_at"],
                   meta_fields=["phase", "stream_heads", "refresh"])
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-call metadata. Static fields: `phase`; `stream_heads`, each layer's streaming KV
    heads (the mode table as Python data, needed by the GPU prefill paths that hand the other
    heads to cuDNN; on a mesh, the heads one device holds, None where devices differ:
    `parallel.device_stream_heads`); `refresh`, whether this decode step reruns the page
    selector (None: decided on the device from `step`; False: reuse the selection as it
    stands)."""

    new_lens: jax.Array  # [B] int32: new tokens per row in this call (0: row inactive)
    modes: jax.Array  # [L, K] int8: DENSE / SELECT / STREAM per (layer, KV head)
    step: jax.Array  # [] int32: decode steps taken (the selector reruns when step % R == 0)
    logits_at: jax.Array | None = None  # [B] int32: the only row whose logits are wanted
    phase: Phase = Phase.PREFILL
    stream_heads: tuple[tuple[int, ...] | None, ...] = ()
    refresh: bool | None = None

    def specs(self) -> AttentionMetadata:
        """Its PartitionSpecs over a ('dp', 'tp') mesh: rows by dp, the mode table by tp."""
        rows = P(DP)
        return dataclasses.replace(self, new_lens=rows, modes=P(None, TP), step=P(),
                                   logits_at=None if self.logits_at is None else rows)


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


class AttentionImpl(Protocol):
    """What the model calls: a static (hashable) value. `cache` and `meta` are whatever the
    implementation carries (serving: the KV cache and an `AttentionMetadata`)."""

    def attend(self, module, qkv: jax.Array, rope, cache, meta, layer: int): ...

    def norm(self, x, delta, weight, eps: float, meta): ...

    def finish(self, cache, meta): ...


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """Attention over the paged KV cache under one sparsity policy and backend. With a
    ('dp', 'tp') `mesh` (`lserve_jax.parallel`), attention and the norms run per device under
    `shard_map` on its own rows, KV heads and pages; None: one device."""

    sparsity: SparsityConfig = SparsityConfig(policy="dense")
    backend: Backend = Backend.reference
    prefill_path: PrefillPath = PrefillPath.windowed
    tuning: KernelTuning = KernelTuning()
    mesh: Mesh | None = None

    def __post_init__(self):
        object.__setattr__(self, "backend", Backend(self.backend))
        object.__setattr__(self, "prefill_path", PrefillPath(self.prefill_path))
        if self.kernels.dense_only and not self.sparsity.is_dense:
            raise ValueError(f"backend={self.backend.value!r} computes dense attention only, but "
                             f"policy={self.sparsity.policy!r}: use backend 'reference' or "
                             "'pallas'")

    @property
    def kernels(self) -> Kernels:
        return kernels(self.backend, self.tuning)

    def attend(self, module, qkv: jax.Array, rope, cache: KVCache, meta: AttentionMetadata,
               layer: int) -> tuple[jax.Array, KVCache]:
        """qkv: [B, T, N + 2K, H] projections before RoPE (on a mesh, each device's block its
        own q, k and v heads: `parallel.qkv_order`); rope: (cos, sin) [B, T, H/2] f32. Rotates
        q and k, writes k/v into the cache, then attends. Returns ([B, T, N, H], cache).
        `module` (the calling Flax module) is unused here."""
        del module
        if self.mesh is None:
            return self._attend(qkv, rope, cache, meta, layer)
        heads, specs = P(DP, None, TP), cache_specs(cache)
        return jax.shard_map(functools.partial(self._attend, layer=layer), mesh=self.mesh,
                             in_specs=(heads, P(DP), specs, meta.specs()),
                             out_specs=(heads, specs), check_vma=False)(qkv, rope, cache, meta)

    def _attend(self, qkv, rope, cache: KVCache, meta: AttentionMetadata, layer: int):
        ops, sparsity = self.kernels, self.sparsity
        streaming = meta.modes[layer] == STREAM  # [K]
        b, t, m, h = qkv.shape
        kh = cache.page_table.shape[2]
        g = (m - 2 * kh) // kh
        if meta.phase is Phase.DECODE and ops.fused_decode:
            with jax.named_scope("decode_attention"):
                qg, cache = ops.append(cache, layer, qkv, rope, meta.new_lens, streaming,
                                       sparsity, query_rows(g))
                out, cache = self._attend_pages(qg, g, cache, layer, meta)
                return out.reshape(b, 1, g * kh, h), cache
        q, k, v = split_heads(qkv, rope, kh)
        with jax.named_scope("kv_write"):
            cache = ops.write(cache, layer, k, v, meta.new_lens, streaming, sparsity,
                              aligned=meta.phase is not Phase.DECODE,
                              head_axis=None if self.mesh is None else TP)
        if meta.phase is Phase.PREFILL:
            with jax.named_scope("prefill_attention"):
                heads = meta.stream_heads[layer] if meta.stream_heads else None
                path = self.prefill_path
                if meta.stream_heads and heads is None:  # devices differ: modes read as data
                    path = PrefillPath.fused
                return ops.prefill(q, k, v, meta.new_lens, heads, streaming, sparsity,
                                   path), cache
        if meta.phase is Phase.CHUNK:
            with jax.named_scope("chunk_attention"):
                keys, values = gather_layer(cache, layer)  # every cached token, this chunk's too
                return ops.chunk(q, keys, values, meta.new_lens, cache.lengths + meta.new_lens,
                                 streaming, sparsity), cache
        with jax.named_scope("decode_attention"):
            out, cache = self._attend_pages(q.reshape(b, kh, g, h), g, cache, layer, meta)
            return out.reshape(b, 1, g * kh, h), cache

    def norm(self, x, delta, weight, eps: float, meta) -> tuple[jax.Array, jax.Array]:
        """(x + delta, weight * rms_norm(x + delta)) over the last axis (delta None: x alone);
        one kernel in a decode step on the Pallas backends. On a mesh each device normalises
        its own rows (delta, a row-parallel projection's output, all-reduced first)."""
        def run(x, delta, weight):
            return self.kernels.norm(x, delta, weight, eps, meta.phase is Phase.DECODE)

        if self.mesh is None:
            return run(x, delta, weight)
        rows = P(DP)
        return jax.shard_map(run, mesh=self.mesh, in_specs=(rows, rows, P()),
                             out_specs=(rows, rows), check_vma=False)(x, delta, weight)

    def finish(self, cache: KVCache, meta: AttentionMetadata) -> KVCache:
        """The cache after the call: each row's length advanced by its new tokens."""
        return dataclasses.replace(cache, lengths=cache.lengths + meta.new_lens)

    def _attend_pages(self, qg, groups, cache, layer, meta):
        """qg: [B, K, G or more, H] (rows past `groups` are zero padding). Reselects this
        layer's pages when due, then attends to each head's pages. Returns ([B, K, G, H],
        cache)."""
        ops, sparsity = self.kernels, self.sparsity
        lengths = cache.lengths + meta.new_lens
        if sparsity.dynamic and meta.refresh is not False:
            def fresh():
                return ops.select(qg[:, :, :groups], cache, lengths, meta.modes, layer, sparsity)

            chosen = selector.reuse_or_select(meta.step, cache.selected[layer], fresh, sparsity,
                                              meta.refresh)
            cache = dataclasses.replace(cache, selected=cache.selected.at[layer].set(chosen))
        return ops.decode(qg, groups, cache, lengths, meta.modes, layer, sparsity), cache


def example_inputs(cfg: ModelConfig, sparsity: SparsityConfig):
    """Smallest valid (tokens, positions, cache, meta) for tracing the model (e.g. `init`)."""
    cache = empty_cache(cfg, sparsity, num_pages=2, batch=1, max_pages=1)
    modes = jnp.asarray(head_modes(cfg, dataclasses.replace(sparsity, policy="dense")))
    meta = AttentionMetadata(new_lens=jnp.ones((1,), jnp.int32), modes=modes,
                             step=jnp.zeros((), jnp.int32))
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, cache, meta
