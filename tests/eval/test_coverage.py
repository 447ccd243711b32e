"""Selection recall (`lserve_jax.eval.coverage`) against brute force on a tiny random model."""

import jax
import numpy as np

from lserve_jax.attention import TrainMetadata, rope_tables, split_heads
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.eval.coverage import coverage
from lserve_jax.model.llama import Llama, init_params, rope_inv_freq
from lserve_jax.sparsity.policy import SELECT, STREAM
from tests.helpers import allowed_keys

CFG = ModelConfig.from_name("tiny")


def test_coverage_is_the_mass_on_the_selected_and_the_heaviest_pages():
    params = init_params(CFG, jax.random.key(0))
    t, page, logical, budget = 70, 8, 4, 24  # 3 pages: the own one + 2 chosen
    sequence = np.random.default_rng(0).integers(0, CFG.vocab_size, t)
    queries = np.array([9, 40, 63, 69])
    modes = np.full((CFG.n_layers, CFG.n_kv_heads), SELECT)
    modes[0, 1] = STREAM
    sparsity = SparsityConfig(page_size=page, logical_page_size=logical, token_budget=budget)
    got = coverage(CFG, params, sequence, queries, sparsity, modes)
    assert sorted(got) == [(0, 0)] + [(layer, kh) for layer in range(1, CFG.n_layers)
                                      for kh in range(CFG.n_kv_heads)]
    positions = np.arange(t)[None]
    _, state = Llama(CFG).apply({"params": params}, sequence[None], positions, None,
                                TrainMetadata(), capture_intermediates=True)
    g = CFG.group_size
    for (layer, kh), (selected, oracle) in got.items():
        normed = state["intermediates"][f"layers_{layer}"]["attn_norm"]["__call__"][0][1]
        qkv = np.einsum("BTD,DMH->BTMH", normed, params[f"layers_{layer}"]["attn"]["qkv"])
        q, k, _ = (np.asarray(x, np.float32) for x in split_heads(
            qkv, rope_tables(positions, rope_inv_freq(CFG)), CFG.n_kv_heads))
        mask = allowed_keys(q, k, page, logical, 3)[0]
        for gi in range(g):
            for m, i in enumerate(queries):
                logits = k[0, : i + 1, kh] @ q[0, i, kh * g + gi] / np.sqrt(CFG.head_dim)
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                np.testing.assert_allclose(selected[gi, m], probs[mask[kh * g + gi, i, : i + 1]]
                                           .sum(), atol=1e-4)
                pages = np.bincount(np.arange(i + 1) // page, weights=probs)
                best = np.sort(pages[:-1])[::-1][:2].sum() + pages[-1]
                np.testing.assert_allclose(oracle[gi, m], best, atol=1e-4)
    everything = coverage(CFG, params, sequence, queries,
                          SparsityConfig(page_size=page, logical_page_size=logical,
                                         token_budget=80), modes)
    np.testing.assert_allclose(np.stack(list(everything.values())), 1.0, atol=1e-5)
