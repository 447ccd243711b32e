import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.attention import PagedAttention
from lserve_jax.config import CacheConfig, ModelConfig, RunConfig, SparsityConfig
from lserve_jax import engine as engine_module
from lserve_jax.engine import DecodeState, Engine, decode, decode_step, initial_state
from lserve_jax.model.llama import Llama, init_params
from pallas_kernels._compat import lower_for_cuda

CFG = ModelConfig()
SP = SparsityConfig(policy="dense", page_size=16, logical_page_size=16)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def test_batched_generation_equals_each_request_alone(params):
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=3), pool_fill=np.nan)
    prompts = _prompts([5, 40, 17, 9])  # 4 requests, 3 slots: two waves
    run = RunConfig(max_new_tokens=6)
    together = engine.generate(prompts, run)
    for prompt, done in zip(prompts, together):
        assert engine.generate([prompt], run)[0].tokens == done.tokens
        assert len(done.tokens) == 6 and done.finish_reason == "length"


def test_stop_tokens_end_a_request_early(params):
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=2))
    prompts = _prompts([12, 7], seed=1)
    free = engine.generate(prompts, RunConfig(max_new_tokens=8))
    stop = free[0].tokens[3]
    out = engine.generate(prompts, RunConfig(max_new_tokens=8, stop_tokens=(stop,)))
    first = free[0].tokens.index(stop)
    assert out[0].tokens == free[0].tokens[: first + 1] and out[0].finish_reason == "stop"
    other = free[1].tokens
    expected = other[: other.index(stop) + 1] if stop in other else other
    assert out[1].tokens == expected


def test_sampling_is_seeded(params):
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=2))
    prompts = _prompts([10, 20], seed=2)
    a = engine.generate(prompts, RunConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7))
    b = engine.generate(prompts, RunConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7))
    c = engine.generate(prompts, RunConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8))
    assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]
    greedy = engine.generate(prompts, RunConfig(max_new_tokens=12, temperature=0.0, seed=9))
    assert greedy[0].tokens == engine.generate(prompts[:1], RunConfig(max_new_tokens=12))[0].tokens


def test_sampled_tokens_do_not_depend_on_batch_neighbours_or_waves(params):
    """A seeded request samples the same tokens alone, beside other requests in any order, and
    in a later wave: each token's key is the seed folded with the token's index."""
    prompts = _prompts([10, 20, 15], seed=3)
    run = RunConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=11)
    wide = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=3))
    together = wide.generate(prompts, run)
    alone = [wide.generate([p], run)[0].tokens for p in prompts]
    assert [c.tokens for c in together] == alone
    assert wide.generate(prompts[::-1], run)[2].tokens == alone[0]
    waves = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=1))
    assert [c.tokens for c in waves.generate(prompts, run)] == alone  # one wave each
    assert len({tuple(t) for t in alone}) == 3


def test_exhausted_pool_refuses_one_request_and_serves_the_others(params):
    # 2 layers x 2 KV heads: a 100-token request needs 4 x 7 = 28 pages; the pool has 40
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=1024, max_batch=4, num_pages=41))
    prompts = _prompts([30, 1000, 20], seed=3)
    run = RunConfig(max_new_tokens=4)
    out = engine.generate(prompts, run)
    assert out[1].finish_reason == "refused" and "num_pages" in out[1].error
    assert out[1].tokens == []
    for i in (0, 2):
        assert out[i].tokens == engine.generate([prompts[i]], run)[0].tokens
    assert engine.pages.allocator.free == 40  # everything released


@pytest.mark.parametrize("prompts, match", [
    ([[]], "empty"), ([[1, 2, 600]], "vocabulary"), ([[1] * 120], "max_seq_len"),
    ([[1, 2.7]], "2.7 .float.: token ids must be integers"), ([["5"]], "must be integers"),
    ([[1, True]], "bool")])
def test_bad_requests_raise_with_the_field(params, prompts, match):
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=1))
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, RunConfig(max_new_tokens=16))
    assert engine.pages.allocator.free == engine.pages.allocator.num_pages - 1  # none held


def test_a_backend_that_cannot_run_the_policy_fails_before_any_page_is_taken(params):
    sparsity = SparsityConfig(policy="lserve", page_size=16, logical_page_size=16,
                              token_budget=64, head_pattern="random:0")
    engine = Engine(CFG, params, sparsity, CacheConfig(max_seq_len=128, max_batch=1),
                    gates=np.random.default_rng(0).random((CFG.n_layers, CFG.n_kv_heads)))
    with pytest.raises(ValueError, match="backend='cudnn' computes dense attention only"):
        engine.generate([[1, 2, 3]], RunConfig(max_new_tokens=4, backend="cudnn"))
    assert engine.pages.allocator.free == engine.pages.allocator.num_pages - 1
    assert engine.generate([[1, 2, 3]], RunConfig(max_new_tokens=4))[0].finish_reason == "length"


@pytest.mark.parametrize("policy", ["dense", "lserve"])
def test_decode_does_not_copy_the_cache(params, policy):
    sparsity = SparsityConfig(policy=policy, page_size=16, logical_page_size=16, token_budget=64)
    engine = Engine(CFG, params, sparsity, CacheConfig(max_seq_len=1024, max_batch=2,
                                                       num_pages=16384),
                    gates=np.random.default_rng(0).random((2, 2)))
    cache, modes = engine.cache, jnp.asarray(engine.modes)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    sampling = (jnp.float32(0), jnp.float32(1), jnp.asarray([-1]))
    loop = decode.lower(CFG, PagedAttention(sparsity), 8, params, cache,
                        jnp.zeros(2, jnp.int32), jnp.ones(2, bool), modes, jax.random.key(0),
                        *sampling).compile()
    model = Llama(CFG, PagedAttention(sparsity, "reference"))
    state = DecodeState(jnp.zeros((2, 8), jnp.int32), jnp.ones(2, jnp.int32),
                        jnp.zeros(2, bool), jax.random.key(1))
    step = jax.jit(functools.partial(decode_step, model), donate_argnums=(1,)).lower(
        params, cache, state, modes, sampling[2], *sampling[:2]).compile()
    for compiled in (loop, step):
        memory = compiled.memory_analysis()
        assert memory.alias_size_in_bytes >= cache_bytes  # the cache is updated in place
        assert memory.temp_size_in_bytes < cache_bytes / 4  # and never copied (K alone: ~1/2)


@pytest.mark.parametrize("policy", ["dense", "lserve"])
def test_each_kernel_lowers_once_for_every_layer(params, policy):
    """The layer reaches the kernels as data, so a decode step holds one Triton kernel per op
    whatever the depth (a static layer would compile L copies of each on the GPU)."""
    sparsity = SparsityConfig(policy=policy, page_size=16, logical_page_size=16, token_budget=64)
    engine = Engine(CFG, params, sparsity, CacheConfig(max_seq_len=256, max_batch=1),
                    gates=np.random.default_rng(0).random((CFG.n_layers, CFG.n_kv_heads)))
    state = DecodeState(jnp.zeros((1, 4), jnp.int32), jnp.ones(1, jnp.int32),
                        jnp.zeros(1, bool), jax.random.key(1))

    def step_kernels(cfg, params, cache, modes):
        step = functools.partial(decode_step, Llama(cfg, PagedAttention(sparsity, "pallas")))
        return re.findall(r'triton.*?name = "(\w+)"', lower_for_cuda(
            step, params, cache, state, jnp.asarray(modes), jnp.asarray([-1]), jnp.float32(0),
            jnp.float32(1)))

    kernels = step_kernels(CFG, params, engine.cache, engine.modes)
    selection = ["page_scores", "top_pages"] if policy == "lserve" else []
    assert CFG.n_layers > 1 and sorted(set(kernels)) == sorted(
        ["add_rms_norm", "kv_append", "merge_partials", "sparse_paged_decode"] + selection)
    deeper = dataclasses.replace(CFG, n_layers=CFG.n_layers + 1)
    modes = np.concatenate([engine.modes, engine.modes[-1:]])
    cache = Engine(deeper, None, sparsity, CacheConfig(max_seq_len=256, max_batch=1),
                   gates=np.ones(modes.shape)).cache
    assert step_kernels(deeper, init_params(deeper, jax.random.key(0)), cache, modes) == kernels
    # the serving loop: one step that selects, one that reuses, no per-layer conditional
    pallas = PagedAttention(sparsity, "pallas")
    loop = lower_for_cuda(functools.partial(decode, CFG, pallas, 9), params, engine.cache,
                          jnp.zeros(1, jnp.int32), jnp.ones(1, bool), jnp.asarray(engine.modes),
                          jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.asarray([-1]))
    steps = 2 if policy == "lserve" else 1
    assert sorted(set(re.findall(r'triton.*?name = "(\w+)"', loop))) == sorted(set(kernels))
    assert len(re.findall(r"call @sparse_decode(?:_\d+)?\(", loop)) == CFG.n_layers * steps
    assert len(re.findall(r"call @select_pages(?:_\d+)?\(", loop)) == CFG.n_layers * (steps - 1)
    assert loop.count("stablehlo.case") == steps  # the sampler's, one a step; none per layer


@pytest.mark.parametrize("policy, backend", [
    ("dense", "reference"), ("streaming", "reference"), ("lserve", "reference"),
    ("lserve", "pallas_interpret")])  # lserve's kernels cover streaming and selected heads
def test_chunked_prefill_equals_unchunked(params, policy, backend):
    base = SparsityConfig(page_size=16, logical_page_size=8, token_budget=48, decode_sink=16,
                          decode_local=32, prefill_sink=16, prefill_local=40).for_policy(policy)
    gates = np.random.default_rng(1).random((2, 2))
    prompts = _prompts([150, 61, 97], seed=4)  # ragged; the 32-token chunks split them unevenly
    run = RunConfig(max_new_tokens=6, backend=backend)
    outs = []
    for chunk in (0, 32):
        sparsity = dataclasses.replace(base, prefill_chunk=chunk)
        engine = Engine(CFG, params, sparsity, CacheConfig(max_seq_len=256, max_batch=3), gates,
                        pool_fill=np.nan)
        outs.append([c.tokens for c in engine.generate(prompts, run)])
    assert outs[0] == outs[1]


def _decode_stepwise(model_cfg, attention, max_new, params, cache, first, live, modes, key,
                     temperature, top_p, stops):
    """`decode` one jitted step at a time, the selector rerun decided on the device per step."""
    step = jax.jit(functools.partial(decode_step, Llama(model_cfg, attention)))
    state = initial_state(max_new, first, live, stops, key)
    while not bool(jnp.all(state.done)):
        cache, state = step(params, cache, state, modes, stops, temperature, top_p)
    return state.out, state.count, cache


@pytest.mark.parametrize("reuse", [1, 3])
def test_decode_loop_selects_on_the_same_steps_as_a_per_step_decision(params, monkeypatch,
                                                                      reuse):
    """The loop runs R steps per iteration with the selector's rerun fixed at trace time; it
    must select on the same steps as deciding per step, stop tokens and ragged ends included
    (7 decode steps: not a multiple of R)."""
    sparsity = SparsityConfig(policy="lserve", page_size=16, logical_page_size=8,
                              token_budget=48, decode_sink=16, decode_local=32,
                              reuse_interval=reuse)
    gates = np.random.default_rng(5).random((CFG.n_layers, CFG.n_kv_heads))
    prompts = _prompts([150, 97, 61], seed=6)
    runs = []
    for stepwise in (False, True):
        if stepwise:
            monkeypatch.setattr(engine_module, "decode", _decode_stepwise)
        engine = Engine(CFG, params, sparsity, CacheConfig(max_seq_len=256, max_batch=3),
                        gates, pool_fill=np.nan)
        free = engine.generate(prompts, RunConfig(max_new_tokens=8))
        stop = free[1].tokens[4]  # ends row 1 early (and any other row that samples it)
        out = engine.generate(prompts, RunConfig(max_new_tokens=8, stop_tokens=(stop,)))
        runs.append(([c.tokens for c in free + out], engine.cache))
    (tokens, cache), (expected_tokens, expected_cache) = runs
    assert tokens == expected_tokens
    assert sum(len(t) for t in tokens) < 6 * 8  # the stop token ended rows early
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(expected_cache)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
