"""The engine: continuous batching, per-request sampling and sparsity state, page accounting,
bad requests, and what the jitted steps compile to."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.attention import AttentionMetadata, PagedAttention, Phase
from lserve_jax.config import CacheConfig, ModelConfig, SchedulerConfig, SparsityConfig
from lserve_jax.engine import Engine, steps
from lserve_jax.model.llama import Llama, init_params
from lserve_jax.sampling import SamplingParams
from pallas_kernels._compat import lower_for_cuda

CFG = ModelConfig()
SP = SparsityConfig(policy="dense", page_size=16, logical_page_size=16)
GATES = np.random.default_rng(1).random((CFG.n_layers, CFG.n_kv_heads))


def _small(policy: str, **changes) -> SparsityConfig:
    """Windows and budgets small enough that every policy differs from dense at ~150 tokens."""
    return dataclasses.replace(SparsityConfig(
        page_size=16, logical_page_size=8, token_budget=48, decode_sink=16, decode_local=32,
        prefill_sink=16, prefill_local=40).for_policy(policy), **changes)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def _free(engine: Engine) -> int:
    return engine.pages.allocator.free


@pytest.mark.parametrize("policy, reuse", [("streaming", 4), ("lserve", 3), ("quest", 2)])
def test_each_request_decodes_as_it_does_alone(params, policy, reuse):
    """Greedy outputs are bit-identical (f32) to running each request alone, although
    requests join and leave the batch at different iterations (3 slots, 5 requests of ragged
    prompts and outputs): each has its own reuse phase, streaming ring and statistics."""
    sparsity = _small(policy, reuse_interval=reuse)
    engine = Engine(CFG, params, sparsity, CacheConfig(max_seq_len=256, max_batch=3), GATES,
                    scheduler=SchedulerConfig(decode_steps=6), pool_fill=np.nan)
    prompts = _prompts([150, 61, 97, 33, 120], seed=4)
    lengths = [9, 3, 14, 5, 7]
    together = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in lengths])
    for prompt, n, out in zip(prompts, lengths, together):
        alone = engine.generate([prompt], SamplingParams(max_tokens=n))[0]
        assert out.token_ids == alone.token_ids and len(out.token_ids) == n
    assert _free(engine) == engine.pages.allocator.num_pages - 1


def test_a_waiting_request_takes_a_finished_ones_slot_while_others_decode(params):
    """Two slots: A decodes long, B ends early, C (queued) takes B's slot and finishes while A
    is still decoding. Under the wave schedule C waits until A has finished."""
    prompts = _prompts([20, 30, 25], seed=5)
    lengths = [40, 3, 5]
    order = {}
    for schedule in ("continuous", "wave"):
        engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=2),
                        scheduler=SchedulerConfig(schedule=schedule, decode_steps=4))
        ids = [engine.add_request(p, SamplingParams(max_tokens=n))
               for p, n in zip(prompts, lengths)]
        finished = []
        while engine.has_unfinished():
            finished += [o.request_id for o in engine.step() if o.finished]
        order[schedule] = [ids.index(i) for i in finished]
    assert order["continuous"] == [1, 2, 0]
    assert order["wave"] == [1, 0, 2]


def test_stop_tokens_end_a_request_early(params):
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=2))
    prompts = _prompts([12, 7], seed=1)
    free = engine.generate(prompts, SamplingParams(max_tokens=8))
    stop = free[0].token_ids[3]
    out = engine.generate(prompts, SamplingParams(max_tokens=8, stop_token_ids=[stop]))
    first = free[0].token_ids.index(stop)
    assert out[0].token_ids == free[0].token_ids[: first + 1]
    assert (out[0].finish_reason, out[0].outputs[0].stop_reason) == ("stop", stop)
    other = free[1].token_ids
    assert out[1].token_ids == (other[: other.index(stop) + 1] if stop in other else other)


def test_seeded_sampling_does_not_depend_on_batch_neighbours_or_admission(params):
    """A request's sampled tokens depend on its own seed only: alone, beside others in any
    order, admitted later (one slot), with other requests sampling differently."""
    prompts = _prompts([10, 20, 15], seed=3)
    params_of = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=11),
                 SamplingParams(max_tokens=10, temperature=0.7, top_k=5, seed=12),
                 SamplingParams(max_tokens=10)]  # greedy beside sampled rows
    wide = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=3))
    together = [o.token_ids for o in wide.generate(prompts, params_of)]
    alone = [wide.generate([p], s)[0].token_ids for p, s in zip(prompts, params_of)]
    assert together == alone
    assert wide.generate(prompts[::-1], params_of[::-1])[2].token_ids == alone[0]
    narrow = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=1))
    assert [o.token_ids for o in narrow.generate(prompts, params_of)] == alone
    reseeded = dataclasses.replace(params_of[0], seed=99)
    assert wide.generate(prompts[:1], reseeded)[0].token_ids != alone[0]
    assert alone[2] == wide.generate(prompts[2:], SamplingParams(max_tokens=10, seed=5))[
        0].token_ids  # greedy ignores the seed


def test_top_k_one_is_greedy(params):
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=2))
    prompts = _prompts([10, 20], seed=6)
    greedy = engine.generate(prompts, SamplingParams(max_tokens=8))
    top1 = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=2.0, top_k=1,
                                                   seed=3))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in top1]


def test_no_recompilation_as_requests_come_and_go(params):
    """After a first mix, a second with other arrivals, prompt lengths, output lengths,
    sampling and cancellations compiles nothing (chunked prefill: every shape is fixed)."""
    engine = Engine(CFG, params, _small("lserve", prefill_chunk=32),
                    CacheConfig(max_seq_len=256, max_batch=3), GATES,
                    scheduler=SchedulerConfig(decode_steps=4, prefill_rows=2))
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None)

    def run_mix(lengths, news, temps, seed):
        prompts = _prompts(lengths, seed)
        pending = list(zip(prompts, news, temps))
        ids = []
        while pending or engine.has_unfinished():
            if pending:  # one arrival per iteration
                p, n, t = pending.pop(0)
                ids.append(engine.add_request(p, SamplingParams(max_tokens=n, temperature=t,
                                                                seed=seed)))
            engine.step()
            if len(ids) == 2 and seed == 1:
                engine.abort(ids[0])
        assert _free(engine) == engine.pages.allocator.num_pages - 1

    run_mix([150, 40, 90, 7, 64], [9, 3, 20, 6, 1], [0.0, 1.0, 0.0, 0.5, 0.0], seed=0)
    before = len(compiles)
    assert before > 0  # the listener sees compilations
    run_mix([33, 170, 5, 100, 61, 12], [2, 11, 7, 30, 4, 9], [1.0, 0.0, 0.0, 0.8, 0.0, 1.0],
            seed=1)
    assert compiles[before:] == []


def test_pool_pressure_queues_and_only_a_never_fitting_request_is_refused(params):
    """2 layers x 2 KV heads: a 100-token request needs 4 x 7 = 28 pages; the pool has 40, so
    two such requests run one after the other, and one needing more than 40 is refused."""
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=1024, max_batch=4, num_pages=41))
    prompts = _prompts([96, 1000, 90], seed=3)
    out = engine.generate(prompts, SamplingParams(max_tokens=4))
    assert out[1].finish_reason == "refused" and "num_pages" in out[1].error
    assert out[1].token_ids == []
    for i in (0, 2):
        assert out[i].finish_reason == "length"
        assert out[i].token_ids == engine.generate([prompts[i]], SamplingParams(max_tokens=4))[
            0].token_ids
    assert engine.stats.peak_pages <= 40
    assert _free(engine) == 40


def test_every_page_returns_after_finishes_stops_cancellations_and_refusals(params):
    engine = Engine(CFG, params, _small("lserve"), CacheConfig(max_seq_len=256, max_batch=2,
                                                               num_pages=40), GATES,
                    scheduler=SchedulerConfig(decode_steps=2))
    total = engine.pages.allocator.num_pages - 1
    prompts = _prompts([150, 40, 60, 20, 200], seed=7)
    free = engine.generate(prompts[:1], SamplingParams(max_tokens=8))[0].token_ids
    ids = [engine.add_request(prompts[0], SamplingParams(max_tokens=8,
                                                         stop_token_ids=[free[2]])),
           engine.add_request(prompts[1], SamplingParams(max_tokens=50)),
           engine.add_request(prompts[2], SamplingParams(max_tokens=5)),
           engine.add_request(prompts[3], SamplingParams(max_tokens=30)),
           engine.add_request(prompts[4], SamplingParams(max_tokens=50))]  # 40 > 39 pages
    ends = {}
    for i in range(40):
        for out in engine.step():
            if out.finished:
                ends[out.request_id] = out.finish_reason
        if i == 3:
            assert engine.abort(ids[1]) and not engine.abort("nope")
        if i == 4:
            engine.abort(ids[3])  # still waiting, or just admitted
        if not engine.has_unfinished():
            break
    assert [ends[i] for i in ids] == ["stop", "abort", "length", "abort", "refused"]
    assert _free(engine) == total
    assert engine.generate(prompts[:1], SamplingParams(max_tokens=8))[0].token_ids == free


@pytest.mark.parametrize("prompt, sampling, match", [
    ([], {}, "empty"), ([1, 2, 600], {}, "vocabulary"), ([1] * 120, {}, "max_seq_len"),
    ([1, 2.7], {}, "2.7 .float.: token ids must be integers"), (["5"], {}, "must be integers"),
    ([1, True], {}, "bool"), ("text", {}, "no tokenizer"), ([1, 2], {"stop": ["x"]}, "tokenizer")])
def test_bad_requests_raise_with_the_field(params, prompt, sampling, match):
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=128, max_batch=1))
    with pytest.raises(ValueError, match=match):
        engine.generate([[3, 4], prompt], SamplingParams(max_tokens=16, **sampling))
    assert not engine.has_unfinished()  # the good prompt was not queued either
    assert _free(engine) == engine.pages.allocator.num_pages - 1


@pytest.mark.parametrize("field, value, match", [
    ("max_tokens", 0, "max_tokens=0"), ("temperature", -1.0, "temperature"),
    ("top_p", 0.0, "top_p"), ("top_k", -2, "top_k"), ("seed", 2**40, "seed"),
    ("stop", [""], "stop"), ("stop_token_ids", [-3], "stop_token_ids")])
def test_bad_sampling_params_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=f"SamplingParams.{match}"):
        SamplingParams(**{field: value})


def test_a_backend_that_cannot_run_the_policy_fails_before_any_page_is_taken(params):
    with pytest.raises(ValueError, match="backend='cudnn' computes dense attention only"):
        Engine(CFG, params, _small("lserve"), CacheConfig(max_seq_len=128, max_batch=1), GATES,
               backend="cudnn")


def _decode_inputs(engine: Engine, batch: int):
    return steps.SlotState.greedy(batch), jnp.asarray(engine.modes)


@pytest.mark.parametrize("policy", ["dense", "lserve"])
def test_no_step_copies_the_cache(params, policy):
    """Decode chunks, prefill calls of both phases and slot installs update the donated
    cache in place (a copy of a GPU-sized pool would not fit)."""
    sparsity = SparsityConfig(policy=policy, page_size=16, logical_page_size=16, token_budget=64,
                              prefill_chunk=64)
    engine = Engine(CFG, params, sparsity, CacheConfig(max_seq_len=1024, max_batch=2,
                                                       num_pages=16384), GATES)
    cache, attention = engine.cache, engine.attention
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    state, modes = _decode_inputs(engine, 2)
    prefill_args = (jnp.zeros(1, jnp.int32), jnp.zeros((1, 64), jnp.int32),
                    jnp.ones(1, jnp.int32), modes)
    compiled = [steps.decode.lower(CFG, attention, 8, params, cache, state, modes),
                steps.install.lower(cache, 0, np.zeros(cache.page_table.shape[1:], np.int32))]
    compiled += [steps.prefill.lower(CFG, attention, engine.stream_heads, phase, params, cache,
                                     *prefill_args) for phase in (Phase.PREFILL, Phase.CHUNK)]
    for lowered in compiled:
        memory = lowered.compile().memory_analysis()
        assert memory.alias_size_in_bytes >= cache_bytes  # the cache is updated in place
        assert memory.temp_size_in_bytes < cache_bytes / 4  # and never copied (K alone: ~1/2)


@pytest.mark.parametrize("policy", ["dense", "lserve"])
def test_each_kernel_lowers_once_for_every_layer(params, policy):
    """The layer reaches the kernels as data, so a decode chunk holds one Triton kernel per op
    whatever the depth, and selects on one step of each R with no per-layer conditional."""
    sparsity = SparsityConfig(policy=policy, page_size=16, logical_page_size=16, token_budget=64)
    pallas = PagedAttention(sparsity, "pallas")

    def chunk_ir(cfg, gates):
        engine = Engine(cfg, None, sparsity, CacheConfig(max_seq_len=256, max_batch=1), gates)
        state, modes = _decode_inputs(engine, 1)
        return lower_for_cuda(functools.partial(steps.decode, cfg, pallas, 8),
                              init_params(cfg, jax.random.key(0)), engine.cache, state, modes)

    loop = chunk_ir(CFG, GATES)
    kernels = re.findall(r'triton.*?name = "(\w+)"', loop)
    selection = ["page_scores", "top_pages"] if policy == "lserve" else []
    assert sorted(set(kernels)) == sorted(
        ["add_rms_norm", "kv_append", "merge_partials", "sparse_paged_decode"] + selection)
    bodies = 2 if policy == "lserve" else 1  # the step that selects, the steps that reuse
    assert len(re.findall(r"call @sparse_decode(?:_\d+)?\(", loop)) == CFG.n_layers * bodies
    assert len(re.findall(r"call @select_pages(?:_\d+)?\(", loop)) == CFG.n_layers * (bodies - 1)
    assert loop.count("stablehlo.case") == bodies  # the sampler's, one a step; none per layer
    deeper = dataclasses.replace(CFG, n_layers=CFG.n_layers + 1)
    deeper_kernels = re.findall(r'triton.*?name = "(\w+)"', chunk_ir(deeper, np.ones((3, 2))))
    assert sorted(set(deeper_kernels)) == sorted(set(kernels))
    assert len(deeper_kernels) == len(kernels)


@pytest.mark.parametrize("backend", ["reference", "pallas_interpret"])
def test_chunked_prefill_equals_unchunked(params, backend):
    """lserve has streaming heads (ring + window across chunks) and heads that prefill densely
    and select in decode: its chunks cover what every policy's do."""
    prompts = _prompts([150, 61, 97], seed=4)  # ragged; the 32-token chunks split them unevenly
    outs = []
    for chunk in (0, 32):
        engine = Engine(CFG, params, _small("lserve", prefill_chunk=chunk),
                        CacheConfig(max_seq_len=256, max_batch=3), GATES, backend=backend,
                        scheduler=SchedulerConfig(prefill_rows=3), pool_fill=np.nan)
        outs.append([o.token_ids for o in engine.generate(prompts, SamplingParams(
            max_tokens=6))])
    assert outs[0] == outs[1]


def test_generated_tokens_are_the_argmax_of_one_full_forward_pass(params):
    """Greedy tokens from prefill + decode chunks, with requests joining mid-flight, equal the
    argmax of the model run once over prompt + generated tokens (dense policy)."""
    engine = Engine(CFG, params, SP, CacheConfig(max_seq_len=64, max_batch=2),
                    scheduler=SchedulerConfig(decode_steps=3))
    prompts = _prompts([20, 9, 33], seed=8)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in (7, 2, 5)])
    rows = [p + o.token_ids[:-1] for p, o in zip(prompts, outs)]
    width = max(map(len, rows))
    fresh = Engine(CFG, params, SP, CacheConfig(max_seq_len=64, max_batch=3))
    cache = fresh.cache
    for slot in range(3):
        cache = steps.install(cache, slot, fresh.pages.reserve(width)[0])
    meta = AttentionMetadata(new_lens=jnp.asarray([len(r) for r in rows]),
                             modes=jnp.asarray(fresh.modes), step=jnp.zeros((), jnp.int32))
    tokens = jnp.asarray([r + [0] * (width - len(r)) for r in rows])
    logits, _ = jax.jit(Llama(CFG, PagedAttention(SP)).apply)(
        {"params": params}, tokens, jnp.broadcast_to(jnp.arange(width), tokens.shape), cache,
        meta)
    for prompt, out, row in zip(prompts, outs, logits):
        assert np.argmax(row[len(prompt) - 1:len(prompt) - 1 + len(out.token_ids)],
                         -1).tolist() == out.token_ids
