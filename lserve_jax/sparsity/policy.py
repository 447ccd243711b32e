"""Policies as data: the per-(layer, KV head) attention mode table that every kernel reads.

Modes (`pallas_kernels.layout.HeadMode`): DENSE (all pages / full causal), SELECT (decode
attends to selected pages; prefill is full causal), STREAM (sink + local window in prefill and
decode). A policy is the rule that fills this table from the config and, for static sparsity,
the head gates.
"""

from __future__ import annotations

import numpy as np

from lserve_jax.config import ModelConfig, SparsityConfig
from pallas_kernels.layout import DENSE, SELECT, STREAM

__all__ = ["DENSE", "SELECT", "STREAM", "attended_tokens", "head_modes", "list_width",
           "retrieval_heads"]


def retrieval_heads(gates: np.ndarray, static_sparsity: float) -> np.ndarray:
    """[L, K] bool: heads whose gate reaches one global quantile are retrieval heads.

    threshold = np.quantile(clip(gates, 0, 1), static_sparsity) (linear interpolation, as
    DuoAttention computes it); a head streams iff its gate < threshold, so heads tied at the
    threshold all stay retrieval heads (deterministic; DuoAttention breaks ties with random
    noise instead). Sparsity 0 keeps every head dense; sparsity 1 streams every head.
    """
    clipped = np.clip(np.asarray(gates, np.float64), 0.0, 1.0)
    if static_sparsity <= 0.0 or static_sparsity >= 1.0:
        return np.full(clipped.shape, static_sparsity <= 0.0)
    return clipped >= np.quantile(clipped, static_sparsity)


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
    anchored = sparsity.reuse_anchor and sparsity.reuse_interval > 1
    select = sparsity.budget_pages + anchored if sparsity.dynamic else 0
    stream = sparsity.window_pages if sparsity.policy in ("streaming", "lserve") else 0
    return min(max_pages, max(select, stream))


def attended_tokens(modes: np.ndarray, n_tokens: int, sparsity: SparsityConfig) -> float:
    """Mean keys one decode query attends to per (layer, KV head) at context `n_tokens`
    (the current token included) at a step that selects, with the fixed budget (an anchored
    selection adds a page on the steps after a page crossing; with the adaptive budget this is
    the most a step attends: what it keeps depends on the scores, see the recall task)."""
    n_p = sparsity.page_size
    n_pages = -(-n_tokens // n_p)
    stream = min(n_tokens, sparsity.decode_sink + sparsity.decode_local + 1)
    selected = n_tokens if n_pages <= sparsity.budget_pages else (
        (sparsity.budget_pages - 1) * n_p + (n_tokens - (n_pages - 1) * n_p))
    per_mode = {DENSE: n_tokens, SELECT: selected, STREAM: stream}
    return float(np.mean([per_mode[int(m)] for m in np.ravel(modes)]))
