"""What each policy computes, checked against brute force (issue: sparsity semantics)."""

import ast
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.attention import AttentionMetadata, PagedAttention, Phase
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.model.llama import Llama, init_params
from lserve_jax.sparsity.policy import DENSE, SELECT, STREAM, head_modes
from pallas_kernels._compat import NEG_INF
from pallas_kernels.page_select.reference import page_scores_reference, select_pages_reference
from pallas_kernels.paged_write.reference import write_tokens_reference
from pallas_kernels.sparse_decode.reference import decode_page_lists, sparse_decode_reference
from tests.helpers import allocated_cache

CFG = ModelConfig(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)
GATES = np.array([[0.9, 0.1], [0.2, 0.8]])
BASE = SparsityConfig(page_size=8, logical_page_size=4, token_budget=24, reuse_interval=4,
                      prefill_sink=4, prefill_local=12, decode_sink=8, decode_local=12)


@functools.cache
def _params(cfg):
    return init_params(cfg, jax.random.key(0))


@functools.cache
def _apply(cfg, sparsity):
    return jax.jit(Llama(cfg, PagedAttention(sparsity)).apply)


def teacher_forced(sparsity, tokens, prompt_len, cfg=CFG):
    """Logits of every position when the tokens are fed (prefill, then one per decode step)."""
    b, total = tokens.shape
    modes = head_modes(cfg, sparsity, GATES[: cfg.n_layers])
    cache, _ = allocated_cache(cfg, sparsity, [total] * b, modes)
    apply = _apply(cfg, sparsity)
    positions = jnp.broadcast_to(jnp.arange(total), (b, total))
    meta = AttentionMetadata(new_lens=jnp.full((b,), prompt_len, jnp.int32),
                             modes=jnp.asarray(modes), step=jnp.int32(0))
    logits, cache = apply({"params": _params(cfg)}, tokens[:, :prompt_len],
                          positions[:, :prompt_len], cache, meta)
    out = [logits]
    for i in range(prompt_len, total):
        meta = AttentionMetadata(new_lens=jnp.ones((b,), jnp.int32), modes=jnp.asarray(modes),
                                 step=jnp.int32(i - prompt_len), phase=Phase.DECODE)
        logits, cache = apply({"params": _params(cfg)}, tokens[:, i:i + 1], positions[:, i:i + 1],
                              cache, meta)
        out.append(logits)
    return np.asarray(jnp.concatenate(out, axis=1))


TOKENS = jax.random.randint(jax.random.key(1), (2, 70), 0, CFG.vocab_size)


def test_budget_covering_the_context_is_exactly_dense():
    dense = teacher_forced(BASE.for_policy("dense"), TOKENS, 30)
    for policy in ("quest", "lserve"):
        wide = dataclasses.replace(BASE.for_policy(policy), token_budget=128, decode_local=128,
                                   prefill_local=128, decode_sink=0, prefill_sink=0)
        np.testing.assert_allclose(teacher_forced(wide, TOKENS, 30), dense, rtol=0, atol=1e-6)


def test_local_window_covering_the_context_is_exactly_dense():
    dense = teacher_forced(BASE.for_policy("dense"), TOKENS, 30)
    wide = dataclasses.replace(BASE.for_policy("streaming"), decode_local=80, prefill_local=80)
    np.testing.assert_allclose(teacher_forced(wide, TOKENS, 30), dense, rtol=0, atol=1e-6)
    narrow = teacher_forced(BASE.for_policy("streaming"), TOKENS, 30)
    assert np.abs(narrow - dense).max() > 1e-3  # and the window does change the answer


def _random_cache(lengths, modes, sparsity, seed=0):
    b = len(lengths)
    cache, _ = allocated_cache(CFG, sparsity, [max(lengths) + 8] * b, modes, seed=seed)
    k, v = jax.random.normal(jax.random.key(seed), (2, b, max(lengths), 2, 16))
    kp, vp, kmin, kmax = write_tokens_reference(
        cache.k, cache.v, cache.kmin, cache.kmax, cache.page_table[:, 0], cache.lengths, k, v,
        jnp.asarray(lengths, jnp.int32), jnp.asarray(modes[0] == STREAM),
        sink_pages=sparsity.sink_pages, ring_pages=sparsity.ring_pages)
    cache = cache.__class__(kp, vp, kmin, kmax, cache.page_table,
                            jnp.asarray(lengths, jnp.int32), cache.selected)
    return cache, k, v


def _masked_dense(q, k, v, lengths, visible):
    """Dense attention over contiguous keys with an explicit [B, K, S] visibility mask."""
    logits = jnp.einsum("bkgh,bskh->bkgs", q, k, precision="highest") / 4.0
    logits = jnp.where(visible[:, :, None], logits, -jnp.inf)
    return jnp.einsum("bkgs,bskh->bkgh", jax.nn.softmax(logits, -1), v, precision="highest")


@pytest.mark.parametrize("lengths", [[7, 61], [33, 100], [1, 16]])
def test_streaming_heads_equal_a_masked_dense_reference(lengths):
    sparsity = BASE.for_policy("streaming")
    modes = np.full((2, 2), STREAM)
    cache, k, v = _random_cache(lengths, modes, sparsity)
    q = jax.random.normal(jax.random.key(5), (2, 2, 2, 16))
    out = sparse_decode_reference(q, cache.k, cache.v, cache.page_table, cache.selected,
                                  cache.lengths, jnp.asarray(modes), layer=0, sink=8, local=12,
                                  budget_pages=sparsity.budget_pages)
    s = jnp.arange(k.shape[1])
    t = jnp.asarray(lengths)[:, None] - 1
    visible = (s <= t) & ((s < 8) | (s >= t - 12))
    expected = _masked_dense(q, k, v, lengths, jnp.broadcast_to(visible[:, None], (2, 2, len(s))))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5, rtol=0)


def test_hierarchical_scores_equal_brute_force_from_the_keys():
    sparsity = BASE
    modes = np.full((2, 2), SELECT)
    lengths = [64, 40]
    cache, k, _ = _random_cache(lengths, modes, sparsity, seed=3)
    q = jax.random.normal(jax.random.key(6), (2, 2, 2, 16))
    args = (q, cache.kmin, cache.kmax, cache.page_table, jnp.asarray(lengths), modes)
    scores = np.asarray(page_scores_reference(*args, layer=0, page_size=8))
    for b, n in enumerate(lengths):
        for h in range(2):
            for g in range(2):
                for page in range(n // 8):
                    best = -np.inf
                    for logical in range(2):
                        start = page * 8 + logical * 4
                        keys = np.asarray(k[b, start:start + 4, h])
                        qq = np.asarray(q[b, h, g])
                        best = max(best, np.sum(np.maximum(qq * keys.max(0), qq * keys.min(0))))
                    assert abs(scores[b, h, g, page] - best) < 1e-4 * max(1, abs(best))
    # the score bounds every q.k of its page
    for page in range(5):
        keys = np.asarray(k[0, page * 8:page * 8 + 8, 0])
        assert scores[0, 0, 0, page] >= (keys @ np.asarray(q[0, 0, 0])).max() - 1e-5
    # per-KV-head granularity reduces the group
    summed = np.asarray(page_scores_reference(*args, layer=0, page_size=8, group_reduce="sum"))
    held = scores[:, :, 0] > NEG_INF  # pages past a row's length score NEG_INF
    np.testing.assert_allclose(summed[:, :, 0][held], scores.sum(axis=2)[held], rtol=1e-5)


@pytest.mark.parametrize("keep_sink", [False, True])
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_selection_keeps_the_current_page_and_fills_the_budget(keep_sink, granularity):
    sparsity = dataclasses.replace(BASE, keep_sink_page=keep_sink,
                                   selection_granularity=granularity)
    modes = np.array([[SELECT, DENSE], [SELECT, SELECT]])
    lengths = jnp.asarray([100, 20])  # 13 pages (sparse) and 3 pages (fits the budget: dense)
    cache, _, _ = _random_cache([100, 20], modes, sparsity, seed=4)
    q = jax.random.normal(jax.random.key(7), (2, 2, 2, 16))
    gs = 2 if granularity == "query_head" else 1
    scores = page_scores_reference(q, cache.kmin, cache.kmax, cache.page_table, lengths, modes,
                                   layer=0, page_size=8,
                                   group_reduce="none" if gs == 2 else "sum")
    selected = select_pages_reference(scores, lengths, modes[0], k=2,
                                      width=sparsity.selection_width, page_size=8,
                                      keep_sink_page=keep_sink)
    pages, counts = decode_page_lists(selected, lengths, jnp.asarray(modes[0]), width=13,
                                      page_size=8, local=12, sink_pages=1, budget_pages=3)
    pages, counts = np.asarray(pages), np.asarray(counts)
    chosen = pages[0, 0, :, :3]
    assert (counts[0, 0] == 3).all()  # K = budget / page_size = 3 pages
    assert (chosen[:, -1] == 12).all()  # the current page
    assert all(len(set(row)) == 3 for row in chosen.tolist())
    if keep_sink:
        assert (chosen == 0).any(axis=1).all()
    assert counts[0, 1].tolist() == [13] * gs and pages[0, 1, 0, :13].tolist() == list(range(13))
    assert counts[1, 0].tolist() == [3] * gs  # fits the budget: every page
    assert pages[1, 0, 0, :3].tolist() == [0, 1, 2]


def test_selection_reruns_every_r_steps():
    """One layer, so that the cache (hence every reselection) is the same under R=1 and R=4;
    with more layers a reused list changes the next layers' keys."""
    cfg = dataclasses.replace(CFG, n_layers=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 90), 0, CFG.vocab_size)
    every = teacher_forced(dataclasses.replace(BASE, reuse_interval=1), tokens, 40, cfg)
    fourth = teacher_forced(BASE, tokens, 40, cfg)
    steps = np.arange(50)
    both = 40 + steps[steps % 4 == 0]  # positions decoded on steps where both reselect
    np.testing.assert_allclose(fourth[:, :41], every[:, :41], atol=1e-6, rtol=0)
    np.testing.assert_allclose(fourth[:, both], every[:, both], atol=1e-6, rtol=0)
    reused = 40 + steps[steps % 4 != 0]
    assert np.abs(fourth[:, reused] - every[:, reused]).max() > 1e-4  # reuse is not a no-op


def test_anchor_changes_only_the_steps_after_a_page_crossing():
    """With R = 4, the anchored and the unanchored rule give the same logits except at the steps
    whose page differs from the one current at their selection: there the unanchored rule has
    dropped that page. One layer, so that both runs hold the same keys."""
    cfg = dataclasses.replace(CFG, n_layers=1)
    tokens = jax.random.randint(jax.random.key(3), (2, 90), 0, CFG.vocab_size)
    anchored = teacher_forced(BASE, tokens, 42, cfg)
    dropped = teacher_forced(dataclasses.replace(BASE, reuse_anchor=False), tokens, 42, cfg)
    steps = np.arange(48)
    pos = 42 + steps  # selections at 42, 46, ...: those at 6 mod 8 cross a page 2 steps later
    crossed = pos // BASE.page_size != (pos - steps % 4) // BASE.page_size
    assert crossed.sum() == 12
    # logits at position t come from the step that decodes token t (the step's query is t)
    same, moved = pos[~crossed], pos[crossed]
    np.testing.assert_allclose(anchored[:, same], dropped[:, same], atol=1e-6, rtol=0)
    assert (np.abs(anchored[:, moved] - dropped[:, moved]).max(axis=-1) > 1e-5).all()


def test_policies_are_data_outside_sparsity():
    """No module outside sparsity/ (and the config that defines them) branches on a policy
    name: switching policy changes the mode table and page lists, not the code path."""
    root = pathlib.Path(__file__).parents[2] / "lserve_jax"
    names = {"dense", "streaming", "duo", "quest", "lserve"}
    for path in root.rglob("*.py"):
        if "sparsity" in path.parts or path.name in ("config.py", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                literals = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
                assert not literals & names, f"{path.name}:{node.lineno} branches on a policy"


@pytest.mark.parametrize("policy", ["dense", "streaming", "lserve"])
def test_chunked_prefill_gives_the_logits_of_one_prefill(policy):
    """Chunks of 16 tokens (phase "chunk": queries also attend to the cached tokens) against
    one prefill call; streaming heads keep a ring sized for prefill_local + chunk."""
    sparsity = dataclasses.replace(BASE.for_policy(policy), prefill_chunk=16)
    whole = teacher_forced(sparsity, TOKENS, 70)  # the whole sequence in one prefill
    b, total = TOKENS.shape
    modes = head_modes(CFG, sparsity, GATES)
    cache, _ = allocated_cache(CFG, sparsity, [total] * b, modes)
    apply = _apply(CFG, sparsity)
    positions = jnp.broadcast_to(jnp.arange(total), (b, total))
    parts = []
    for start in range(0, total, 16):
        stop = min(total, start + 16)
        meta = AttentionMetadata(new_lens=jnp.full((b,), stop - start, jnp.int32),
                                 modes=jnp.asarray(modes), step=jnp.int32(0),
                                 phase=Phase.PREFILL if start == 0 else Phase.CHUNK)
        logits, cache = apply({"params": _params(CFG)}, TOKENS[:, start:stop],
                              positions[:, start:stop], cache, meta)
        parts.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(parts, axis=1)), whole, atol=1e-5,
                               rtol=0)
