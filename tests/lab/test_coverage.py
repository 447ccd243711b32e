"""The `recall` task (`lserve_jax.lab.coverage`): kept and oracle shares against a per-query
brute force on a tiny random model, the reuse anchor's page, config errors, an end-to-end run,
and the committed testbed's concentration."""

import dataclasses
import functools
import json
import pathlib
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.attention import rope_tables, split_heads
from lserve_jax.cli import main
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.lab import coverage
from lserve_jax.lab.ablation import variants
from lserve_jax.lab.coverage import recall, teacher_forced_qk
from lserve_jax.lab.experiment import ExperimentConfig, load_experiment
from lserve_jax.lab.tasks import TASKS, make_sample
from lserve_jax.lab.train_attention import TrainAttention, TrainMetadata
from lserve_jax.model import LoadedModel, load_model
from lserve_jax.model.llama import Llama, init_params, rope_inv_freq
from lserve_jax.sparsity.heads import policy_gates
from lserve_jax.sparsity.policy import SELECT, STREAM, head_modes

CFG = ModelConfig.from_name("tiny")  # 2 layers, 4 query / 2 KV heads, head_dim 16
T, PROMPT, STEPS = 200, 190, 9
PAGES = dict(page_size=16, logical_page_size=8, token_budget=48)  # 3 pages of 12 held
RECALL_CONFIGS = [p for p in sorted((pathlib.Path(__file__).parents[2] / "experiments" /
                                     "configs").glob("*.toml"))
                  if tomllib.loads(p.read_text()).get("task") == "recall"]


@pytest.fixture(scope="module")
def tiny():
    """(params, tokens, q [L, T, N, H], k [L, T, K, H]) of a random tiny model, q and k taken
    from the captured norms (not through `teacher_forced_qk`)."""
    params = init_params(CFG, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, T)
    positions = np.arange(T)[None]
    _, state = Llama(CFG, TrainAttention()).apply({"params": params}, tokens[None], positions,
                                                  None, TrainMetadata(),
                                                  capture_intermediates=True)
    rope = rope_tables(positions, rope_inv_freq(CFG))
    qs, ks = [], []
    for layer in range(CFG.n_layers):
        normed = state["intermediates"][f"layers_{layer}"]["attn_norm"]["__call__"][0][1]
        qkv = jnp.einsum("BTD,DMH->BTMH", normed, params[f"layers_{layer}"]["attn"]["qkv"])
        q, k, _ = split_heads(qkv, rope, CFG.n_kv_heads)
        qs.append(np.asarray(q[0], np.float32))
        ks.append(np.asarray(k[0], np.float32))
    return params, tokens, np.stack(qs), np.stack(ks)


def brute_force(q, k, at, page, logical, budget, reduce):
    """(kept, oracle) [L, Q, N]: each query at `at` selecting for itself (R = 1): its own page
    and the budget - 1 earlier pages with the best Quest bound (per query head, or summed over
    the heads of a KV head), keys up to itself; oracle: the same count of heaviest pages."""
    n_l, _, n, h = q.shape
    g = n // k.shape[2]
    kept, oracle = np.zeros((n_l, len(at), n)), np.zeros((n_l, len(at), n))
    for layer in range(n_l):
        for i, t in enumerate(at):
            cur = t // page
            bounds = np.zeros((n, cur))
            for head in range(n):
                keys, qh = k[layer, :, head // g], q[layer, t, head]
                for p in range(cur):
                    bounds[head, p] = max(
                        np.sum(np.maximum(qh * keys[s:s + logical].min(0),
                                          qh * keys[s:s + logical].max(0)))
                        for s in range(p * page, (p + 1) * page, logical))
            if reduce:
                bounds = np.repeat(bounds.reshape(-1, g, cur).sum(1), g, axis=0)
            for head in range(n):
                logits = k[layer, :t + 1, head // g] @ q[layer, t, head] / np.sqrt(h)
                probs = np.exp(logits - logits.max())
                mass = np.bincount(np.arange(t + 1) // page, weights=probs / probs.sum())
                chosen = np.argsort(-bounds[head], kind="stable")[:budget - 1]
                kept[layer, i, head] = mass[chosen].sum() + mass[cur]
                oracle[layer, i, head] = np.sort(mass[:cur])[::-1][:budget - 1].sum() + mass[cur]
    return kept, oracle


@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_kept_and_oracle_match_a_per_query_brute_force(tiny, granularity):
    params, tokens, q, k = tiny
    sparsity = SparsityConfig(**PAGES, reuse_interval=1, selection_granularity=granularity)
    modes = np.full((CFG.n_layers, CFG.n_kv_heads), SELECT)
    got_q, got_k = teacher_forced_qk(CFG, params, jnp.asarray(tokens, jnp.int32))
    tol = 1e-5  # f32 end to end: summation order only (shares of a softmax summing to 1)
    np.testing.assert_allclose(got_k, k, atol=tol)
    got = recall(got_q, got_k, PROMPT, STEPS, sparsity, modes)
    kept, oracle = brute_force(q, k, PROMPT + np.arange(STEPS), 16, 8, 3,
                               reduce=granularity == "kv_head")
    shape = (CFG.n_layers, STEPS, CFG.n_heads)
    np.testing.assert_allclose(got["kept"].reshape(shape), kept, atol=tol)
    np.testing.assert_allclose(got["oracle"].reshape(shape), oracle, atol=tol)
    assert np.all(got["pages"] == 3)
    assert np.all(kept < 1 - 1e-3)  # sparse: the check is not vacuous


@pytest.mark.parametrize("change", [
    dict(reuse_interval=4),
    dict(reuse_interval=3, reuse_anchor=False, adaptive_p=0.5, keep_sink_page=True,
         selection_granularity="kv_head"),
    dict(token_budget=256)])
def test_kept_never_beats_the_oracle(tiny, change):
    _, _, q, k = tiny
    sparsity = SparsityConfig(**{**PAGES, **change})
    modes = np.full((CFG.n_layers, CFG.n_kv_heads), SELECT)
    got = recall(q, k, PROMPT, STEPS, sparsity, modes)
    # kept and oracle sum the same page masses (f32): 1e-6 is rounding of sums of <= 13 terms
    assert np.all((got["kept"] >= 0) & (got["kept"] <= got["oracle"] + 1e-6))
    assert np.all(got["oracle"] <= 1 + 1e-6)
    if sparsity.budget_pages >= -(-T // sparsity.page_size):  # the budget holds every page
        np.testing.assert_allclose(got["kept"], 1.0, atol=1e-6)
    else:
        assert np.all(got["pages"] <= sparsity.budget_pages + 1)


def test_the_anchor_keeps_the_page_left_behind_until_the_next_selection():
    """Step 0 (position 63) selects as the last token of page 7; steps 1-3 (page 8) reuse its
    selection. Their queries attend mostly to page 7: without the anchor it is not listed."""
    h, page, prompt = 8, 8, 63
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 72, 1, h)).astype(np.float32)
    k = rng.normal(size=(1, 72, 1, h)).astype(np.float32)
    k[0, 56:64, 0] += 2.0 * q[0, 64:67, 0].mean(0)  # page 7 draws the attention of steps 1-3
    modes = np.array([[SELECT]])
    sparsity = SparsityConfig(page_size=page, logical_page_size=4, token_budget=24,
                              reuse_interval=4)
    on = recall(q, k, prompt, 4, sparsity, modes)
    off = recall(q, k, prompt, 4, dataclasses.replace(sparsity, reuse_anchor=False), modes)
    logits = k[0, :67, 0] @ q[0, 64:67, 0].T / np.sqrt(h)  # [keys, steps 1-3]
    probs = np.exp(logits - logits.max(0))
    probs = np.where(np.arange(67)[:, None] <= np.arange(64, 67), probs, 0.0)
    page7 = probs[56:64].sum(0) / probs.sum(0)
    assert np.all(page7 > 0.5)
    np.testing.assert_allclose(on["kept"][0, 1:, 0, 0] - off["kept"][0, 1:, 0, 0], page7,
                               atol=1e-5)  # f32 softmax against f64 numpy
    np.testing.assert_allclose(on["kept"][0, 0], off["kept"][0, 0])
    assert on["pages"][0, :, 0, 0].tolist() == [3, 4, 4, 4]
    assert off["pages"][0, :, 0, 0].tolist() == [3, 3, 3, 3]


def test_policies_that_select_nothing_are_refused():
    with pytest.raises(ValueError, match="ExperimentConfig.policies.*'quest' or 'lserve'"):
        ExperimentConfig(task="recall", policies=("dense", "duo"))
    with pytest.raises(ValueError, match="ExperimentConfig.sweep"):
        ExperimentConfig(task="recall", sweep="precision", sweep_values=("auto/int8",))


@pytest.mark.parametrize("path", RECALL_CONFIGS, ids=lambda p: p.stem)
def test_recall_configs_build_every_variant(path):
    exp = load_experiment(path)
    assert len(variants(exp)) == max(1, len(exp.sweep_values))


def test_cli_runs_the_recall_task(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(coverage, "load_model", functools.partial(_tiny_model, tiny[0]))
    path = tmp_path / "recall.toml"
    path.write_text('name = "rc"\ntask = "recall"\nmodel = "tiny"\npolicies = ["dense", '
                    '"lserve"]\ncontexts = [256]\ntasks = ["passkey"]\ndepths = [0.5]\n'
                    'samples = 1\nsweep = "reuse_interval"\nsweep_values = [1, 4]\n'
                    '[sparsity]\npage_size = 32\nlogical_page_size = 16\ntoken_budget = 64\n'
                    'head_pattern = "random:0"\n')
    main(["run", str(path), "--output-dir", str(tmp_path)])
    assert "skipping ['dense']" in capsys.readouterr().out
    record = json.loads((tmp_path / "rc.json").read_text())
    sparsity = SparsityConfig(head_pattern="random:0")
    modes = head_modes(CFG, sparsity, policy_gates(sparsity, CFG))
    assert STREAM in modes and len(record["rows"]) == 2 * int((modes == SELECT).sum()) > 0
    assert [(r["policy"], r["reuse_interval"]) for r in record["summary"]] == [
        ("lserve", "1"), ("lserve", "4")]
    assert record["config"]["task"] == "recall" and record["platform"] == "cpu"
    row = record["rows"][0]
    assert row["steps"] == 4 and len(row["kept_per_query_head"]) == CFG.group_size
    assert 0 <= row["kept@256"] == row["kept"] <= row["oracle"] <= 1 and row["pages"] == 3
    # each missed step loses over half its mass, and a mean under half needs a missed step
    assert row["missed"] <= 2 * (1 - row["kept"]) + 1e-6
    assert row["missed"] > 0 or row["kept"] >= 0.5
    assert "| policy | reuse_interval | layer |" in (tmp_path / "rc.md").read_text()
    assert (tmp_path / "rc.png").stat().st_size > 0


def _tiny_model(params, name, seed, weight_dtype):
    assert (name, weight_dtype) == ("tiny", "auto")
    return LoadedModel(CFG, params)


def test_the_testbed_keeps_its_attention_on_the_selected_pages():
    """The concentration the testbed recipe trains: at the answer steps of 1K prompts of every
    task, each retrieval head of the committed testbed keeps >= 95% of its dense attention on
    the pages LServe attends to with the policy tables' 16/4 pages, 256 tokens, R = 1."""
    exp = load_experiment("experiments/configs/policies_pages16_r1.toml")
    sparsity = exp.sparsity.for_policy("lserve")
    testbed = load_model("testbed", 0)
    cfg = testbed.config
    modes = head_modes(cfg, sparsity, policy_gates(sparsity, cfg, testbed.pattern))
    assert (modes == SELECT).sum() == 6
    for task in TASKS:
        s = make_sample(task, 1024, 0.5, 123)
        tokens = np.zeros(1040, np.int32)  # every task's prompt and answer: one compile
        tokens[:1024 + len(s.answer)] = np.concatenate([s.prompt, s.answer])
        q, k = teacher_forced_qk(cfg, testbed.params, jnp.asarray(tokens))
        kept = recall(q, k, len(s.prompt), len(s.answer) - 1, sparsity, modes)["kept"]
        per_head = kept.mean(axis=(1, 3))[modes == SELECT]
        assert per_head.min() >= 0.95, task
