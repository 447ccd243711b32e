"""Selection recall (`lserve_jax.lab.coverage`) against brute force on a tiny random model, and
on the committed testbed (stage 11)."""

import jax
import numpy as np

from lserve_jax.attention import rope_tables, split_heads
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.lab.coverage import coverage
from lserve_jax.lab.experiment import load_experiment
from lserve_jax.lab.tasks import TASKS, make_sample
from lserve_jax.lab.train_attention import TrainAttention, TrainMetadata
from lserve_jax.model import load_model
from lserve_jax.sparsity.heads import policy_gates
from lserve_jax.model.llama import Llama, init_params, rope_inv_freq
from lserve_jax.sparsity.policy import SELECT, STREAM, head_modes
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
    _, state = Llama(CFG, TrainAttention()).apply({"params": params}, sequence[None],
                                                  positions, None,
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


def test_the_testbed_keeps_its_attention_on_the_selected_pages():
    """The concentration the testbed recipe trains, at small scale: at the answer tokens of 1K
    prompts of every task, each retrieval head of the committed testbed keeps >= 95% of its
    dense attention on the pages LServe selects with the policy tables' 16/4 pages and 256
    tokens (the model before the recipe's concentration steps kept 57-62% on average over its
    heads on the same prompts)."""
    exp = load_experiment("experiments/configs/policies_pages16_r1.toml")
    sparsity = exp.sparsity.for_policy("lserve")
    testbed = load_model("testbed", 0)
    cfg, params = testbed.config, testbed.params
    modes = head_modes(cfg, sparsity, policy_gates(sparsity, cfg, testbed.pattern))
    for task in TASKS:
        s = make_sample(task, 1024, 0.5, 123)
        sequence = np.concatenate([s.prompt, s.answer[:-1]])
        got = coverage(cfg, params, sequence, np.arange(len(s.prompt), len(sequence)),
                       sparsity, modes)
        assert len(got) == 6
        assert min(float(mass[0].mean()) for mass in got.values()) >= 0.95, task
