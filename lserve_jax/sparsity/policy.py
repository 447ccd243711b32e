"""Policies as data: the per-(layer, KV head) attention mode table that every kernel reads.

Modes: DENSE (all pages / full causal), SELECT (decode attends to selected pages; prefill is
full causal), STREAM (sink + local window in prefill and decode). A policy is the rule that
fills this table from the config and, for static sparsity, the head gates.
"""

from __future__ import annotations

import numpy as np

from lserve_jax.config import ModelConfig, SparsityConfig

DENSE, SELECT, STREAM = 0, 1, 2


def retrieval_heads(gates: np.ndarray, static_sparsity: float) -> np.ndarray:
    """[L, K] bool: heads at or above one global quantile of the gates are retrieval heads.

    Exactly round(static_sparsity * L * K) heads stream: those with the smallest gates, ties
    broken by (layer, head) order, the earlier head streaming first (deterministic).
    """
    flat = np.clip(np.asarray(gates, np.float64), 0.0, 1.0).ravel()
    n_stream = int(round(static_sparsity * flat.size))
    order = np.lexsort((np.arange(flat.size), flat))  # ascending gate, then index
    retrieval = np.ones(flat.size, bool)
    retrieval[order[:n_stream]] = False
    return retrieval.reshape(np.shape(gates))


def head_modes(model: ModelConfig, sparsity: SparsityConfig,
               gates: np.ndarray | None = None) -> np.ndarray:
    """[L, K] int8 mode table for the policy; `gates` ([L, K], DuoAttention's alpha) is needed
    by the static policies (duo, lserve)."""
    shape = (model.n_layers, model.n_kv_heads)
    policy = sparsity.policy
    if policy == "streaming":
        modes = np.full(shape, STREAM)
    elif sparsity.static:
        if gates is None:
            raise ValueError(f"policy {policy!r} splits heads statically and needs head gates: "
                             "set SparsityConfig.head_pattern to a DuoAttention pattern directory")
        if np.shape(gates) != shape:
            raise ValueError(f"head gates have shape {np.shape(gates)} but the model has "
                             f"(n_layers, n_kv_heads) = {shape}: use the pattern of this model")
        inner = SELECT if sparsity.dynamic else DENSE
        modes = np.where(retrieval_heads(gates, sparsity.static_sparsity), inner, STREAM)
    else:
        modes = np.full(shape, SELECT if sparsity.dynamic else DENSE)
    modes[: sparsity.dense_layers] = DENSE
    return modes.astype(np.int8)


def list_width(sparsity: SparsityConfig, max_pages: int) -> int:
    """Static width S of the decode page lists: the most pages any head of the policy can visit."""
    may_be_dense = sparsity.policy in ("dense", "duo") or sparsity.dense_layers > 0
    if may_be_dense:
        return max_pages
    select = sparsity.budget_pages if sparsity.dynamic else 0
    stream = sparsity.stream_pages if sparsity.policy in ("streaming", "lserve") else 0
    return min(max_pages, max(select, stream))
