"""Training-time attention in plain, differentiable jnp: what a head computes when the testbed
trains under a policy's restriction. `TrainAttention` is the model's attention over whole
sequences without a cache (training, distillation, coverage); `streaming_train` is a streaming
head (sink + local keys); `selected_train` a retrieval head of LServe's decode (Quest-selected
pages) at chosen queries (a row's answer tokens: O(answers * T) memory); `selected_mass` how much
of a head's dense attention those pages keep there (the testbed's concentration loss).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lserve_jax.attention import split_heads
from pallas_kernels.rms_norm.reference import add_rms_norm_reference


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


@dataclasses.dataclass(frozen=True)
class TrainAttention:
    """The model's attention over whole sequences, no cache: `Llama(cfg, TrainAttention())`
    applied with cache None and a `TrainMetadata`. `remat`: each layer's attention is
    recomputed in the backward pass instead of keeping its intermediates (the streaming
    branch's f32 probabilities are the largest), trading time for memory."""

    remat: bool = False

    def attend(self, module, qkv, rope, cache, meta: TrainMetadata, layer: int):
        q, k, v = split_heads(qkv, rope, module.cfg.n_kv_heads)
        attend = jax.checkpoint(attend_train, static_argnums=3) if self.remat else attend_train
        out = attend(q, k, v, layer, meta)
        if meta.concentrate:
            module.sow("intermediates", "kept_mass",
                       selected_mass(q, k, *meta.concentrate, at=meta.select_at))
        return out, cache

    def norm(self, x, delta, weight, eps: float, meta):
        return add_rms_norm_reference(x, delta, weight, eps=eps)

    def finish(self, cache, meta):
        return cache


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


def streaming_train(q: jax.Array, k: jax.Array, v: jax.Array, sink: int,
                    local: int) -> jax.Array:
    """Sink + local attention (query i sees keys j <= i with j < sink or j >= i - local) in
    plain, differentiable jnp, in O(T * (2 * local + sink)) memory: queries go in blocks of
    `local`, each against its own and the previous key block plus the sink keys (softmax in
    f32). q: [B, T, N, H]; k, v: [B, T, K, H]; returns [B, T, N, H] f32."""
    b, t, n, h = q.shape
    kh, blk = k.shape[2], max(1, min(local, t))
    nb = -(-t // blk)
    pad = ((0, 0), (0, nb * blk - t), (0, 0), (0, 0))
    qb = jnp.pad(q, pad).reshape(b, nb, blk, kh, n // kh, h)
    kb, vb = (jnp.pad(x, pad).reshape(b, nb, blk, kh, h) for x in (k, v))
    pair = [jnp.concatenate([jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1], x],
                            axis=2) for x in (kb, vb)]  # [B, nb, 2 blk, K, H]: previous, own
    s = min(sink, t)
    qpos = (jnp.arange(nb) * blk)[:, None] + jnp.arange(blk)  # [nb, blk]
    kpos = (jnp.arange(nb) * blk)[:, None] + jnp.arange(-blk, blk)  # [nb, 2 blk]
    near = ((kpos[:, None] <= qpos[..., None]) & (kpos[:, None] >= qpos[..., None] - local)
            & (kpos[:, None] >= s))  # the sink keys are counted once, below
    far = jnp.arange(s) <= qpos[..., None]  # [nb, blk, s]
    scale = h ** -0.5
    scores = jnp.concatenate([
        jnp.einsum("bnqkgh,bnjkh->bnkgqj", qb, pair[0], preferred_element_type=jnp.float32),
        jnp.einsum("bnqkgh,bjkh->bnkgqj", qb, k[:, :s], preferred_element_type=jnp.float32)],
        axis=-1) * scale
    mask = jnp.concatenate([near, far], axis=-1)[None, :, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    out = (jnp.einsum("bnkgqj,bnjkh->bnqkgh", probs[..., :2 * blk], pair[1].astype(jnp.float32))
           + jnp.einsum("bnkgqj,bjkh->bnqkgh", probs[..., 2 * blk:], v[:, :s].astype(jnp.float32)))
    return out.reshape(b, nb * blk, n, h)[:, :t]


def selected_train(q: jax.Array, k: jax.Array, v: jax.Array, page_size: int,
                   logical_page_size: int, budget_pages: int, at: jax.Array) -> jax.Array:
    """The queries at positions `at` ([B, T'] int32; >= T pads) as retrieval heads of a decode
    step: query i attends to the keys j <= i of its own page (i // page_size) and of the
    budget_pages - 1 earlier pages with the best Quest bounds for it (each query head chooses
    its own, as `page_select`'s reference with group_reduce "none": a logical page scores
    sum_h max(q_h kmin_h, q_h kmax_h) over the channel-wise min / max of its keys, a physical
    page the max of its logical pages). With budget_pages - 1 or fewer earlier pages, all are
    kept. The choice is not differentiated; attention over the chosen keys is (softmax in f32).
    q: [B, T, N, H]; k, v: [B, T, K, H]; returns [B, T', N, H] f32."""
    logits, mask = _decode_view(q, k, page_size, logical_page_size, budget_pages, at)
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    vp = jnp.pad(v, ((0, 0), (0, logits.shape[-1] - v.shape[1]), (0, 0), (0, 0)))
    out = jnp.einsum("bkgqj,bjkh->bqkgh", probs, vp.astype(jnp.float32))
    return out.reshape(*at.shape, q.shape[2], q.shape[3])


def selected_mass(q: jax.Array, k: jax.Array, page_size: int, logical_page_size: int,
                  budget_pages: int, at: jax.Array) -> jax.Array:
    """[B, K, G, T'] f32: the share of each query's causal attention (the queries at `at`, as in
    `selected_train`) that falls on the keys `selected_train` keeps for it: LServe's selection
    recall, differentiable in q and k (the choice is not). q: [B, T, N, H]; k: [B, T, K, H]."""
    probs, mask = dense_view(q, k, page_size, logical_page_size, budget_pages, at)
    return jnp.sum(jnp.where(mask, probs, 0.0), axis=-1)


def dense_view(q: jax.Array, k: jax.Array, page_size: int, logical_page_size: int,
               budget_pages: int, at: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(probs, mask), [B, K, G, T', Tp] each (Tp: T padded to whole pages): the causal (dense)
    attention of the queries at `at` (>= T pads) over every key, f32, and the keys
    `selected_train` keeps for them."""
    logits, mask = _decode_view(q, k, page_size, logical_page_size, budget_pages, at)
    pos = jnp.minimum(at, q.shape[1] - 1)
    causal = jnp.arange(logits.shape[-1]) <= pos[:, None, None, :, None]
    return jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1), mask


def _decode_view(q, k, page_size, logical_page_size, budget_pages, at):
    """(logits [B, K, G, T', Tp] f32 of the queries at `at` against every key, padded to
    Tp = whole pages; keys mask [B, K, G, T', Tp] of what LServe's decode attends to)."""
    b, t, n, h = q.shape
    tp = -(-t // page_size) * page_size
    kp = jnp.pad(k, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    pos = jnp.minimum(at, t - 1)
    qb = jnp.take_along_axis(q, pos[:, :, None, None], axis=1).reshape(
        b, -1, k.shape[2], n // k.shape[2], h)
    chosen = quest_choice(qb, pos, page_stats(kp, logical_page_size), page_size,
                          logical_page_size, budget_pages - 1)
    logits = jnp.einsum("bqkgh,bjkh->bkgqj", qb, kp,
                        preferred_element_type=jnp.float32) * h ** -0.5
    return logits, page_keys(chosen, pos, page_size, tp)


def page_stats(k: jax.Array, logical_page_size: int) -> tuple[jax.Array, jax.Array]:
    """(kmin, kmax) [B, S / N_L, K, H] f32: the channel-wise min and max of the keys k
    [B, S, K, H] of each logical page (S a multiple of N_L), as the cache keeps them."""
    b, t, kh, h = k.shape
    logical = jax.lax.stop_gradient(k).astype(jnp.float32).reshape(
        b, t // logical_page_size, logical_page_size, kh, h)
    return logical.min(axis=2), logical.max(axis=2)


def quest_choice(q: jax.Array, pos: jax.Array, pages: tuple[jax.Array, jax.Array],
                 page_size: int, logical_page_size: int, keep: int) -> jax.Array:
    """[B, K, G, T, M] bool: for each query q [B, T, K, G, H] at positions pos [B, T], the (at
    most) `keep` pages before its own with the best Quest bounds, given the logical-page key
    statistics `pages` = (kmin, kmax) [B, S / N_L, K, H] of S keys; M = S / page_size."""
    lo, hi = pages
    qf = jax.lax.stop_gradient(q).astype(jnp.float32)
    bound = (jnp.einsum("bqkgh,blkh->bkgql", jnp.maximum(qf, 0), hi)
             + jnp.einsum("bqkgh,blkh->bkgql", jnp.minimum(qf, 0), lo))
    scores = bound.reshape(*bound.shape[:-1], -1, page_size // logical_page_size).max(axis=-1)
    earlier = (jnp.arange(scores.shape[-1]) < (pos // page_size)[..., None])[:, None, None]
    scores = jnp.where(earlier, scores, -jnp.inf)
    keep = min(keep, scores.shape[-1])
    kth = (jax.lax.top_k(scores, keep)[0][..., -1:] if keep
           else jnp.full_like(scores[..., :1], jnp.inf))
    return earlier & (scores >= kth)  # kth = -inf when fewer pages: all earlier ones


def page_keys(chosen: jax.Array, pos: jax.Array, page_size: int, n_keys: int) -> jax.Array:
    """[B, K, G, T, n_keys] bool: the keys a query at pos [B, T] attends to given its chosen
    earlier pages [B, K, G, T, M]: theirs and its own page's, up to itself."""
    kpage = jnp.arange(n_keys) // page_size
    own = kpage == (pos // page_size)[..., None]  # [B, T, n_keys]
    causal = jnp.arange(n_keys) <= pos[..., None]
    return (jnp.take(chosen, kpage, axis=-1) | own[:, None, None]) & causal[:, None, None]
