"""Tensor (TP = 2 / 4 / 8) and data (DP = 2) parallel engines give the single-device logits and
tokens (f32) under every policy: prefill logits, teacher-forced decode logits, greedy tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lserve_jax.attention import AttentionMetadata, Phase
from lserve_jax.cache.paged import cache_specs
from lserve_jax.config import POLICIES, Backend, CacheConfig, ModelConfig, ParallelConfig
from lserve_jax.config import SchedulerConfig, SparsityConfig
from lserve_jax.engine import Engine
import lserve_jax.engine.steps as steps
from lserve_jax.model.llama import Llama, init_params
from lserve_jax.model.quant import quantize_params
from lserve_jax.sampling import SamplingParams
from tests.conftest import TOLERANCE

CFG = ModelConfig(n_heads=16, n_kv_heads=8, head_dim=16, dim=64, ffn_dim=128)
PARAMS = init_params(CFG, jax.random.key(0))
WINDOWS = dict(page_size=8, logical_page_size=4, decode_sink=8, decode_local=16,
               prefill_sink=8, prefill_local=16, token_budget=32)
GATES = np.random.default_rng(1).random((CFG.n_layers, CFG.n_kv_heads))
PROMPTS = [np.random.default_rng(n).integers(0, CFG.vocab_size, n).tolist() for n in (37, 70, 101)]
FORCED = np.random.default_rng(7).integers(0, CFG.vocab_size, (3, 6))  # teacher-forced tokens
# (policy, tp, dp, shard_vocab): every policy with several KV heads a device (TP = 2) and one
# (TP = 8); lserve (static + dynamic sparsity) also at TP = 4 and with data-parallel replicas;
# one case keeps the vocabulary whole on every device (each case costs ~10 s of compilation on
# two CPU cores; the full policy x TP = 2 / 4 / 8 x DP matrix passes too)
CASES = [(p, tp, 1, tp != 8 or p != "duo") for p in POLICIES for tp in (2, 8)] + [
    ("lserve", tp, dp, True) for tp, dp in ((4, 1), (4, 2))]


def sparsity(policy: str) -> SparsityConfig:
    flat = {"logical_page_size": WINDOWS["page_size"]} if policy == "quest" else {}
    return SparsityConfig(policy=policy, **{**WINDOWS, **flat})


def engine(policy, tp, dp, backend=Backend.reference, kv_dtype="auto", fp8=False,
           **parallel) -> Engine:
    gates = GATES if sparsity(policy).static else None
    cfg, params = quantize_params(CFG, PARAMS) if fp8 else (CFG, PARAMS)
    return Engine(cfg, params, sparsity(policy),
                  CacheConfig(max_seq_len=192, max_batch=4, kv_dtype=kv_dtype), gates,
                  backend=backend, parallel=ParallelConfig(tp=tp, dp=dp, **parallel),
                  scheduler=SchedulerConfig(prefill_rows=3, decode_steps=8))


@functools.partial(jax.jit, static_argnums=(0, 1))
def forced_logits(cfg, attention, params, cache, slots, tokens, modes):
    """[S, 3, V] logits of decoding `tokens` [3, S] in cache rows `slots` (others idle), the
    page selector rerun at every step."""
    active = jnp.zeros(cache.lengths.shape, jnp.int32).at[slots].set(1)

    def step(cache, tok):
        meta = AttentionMetadata(new_lens=active, modes=modes, step=jnp.zeros((), jnp.int32),
                                 phase=Phase.DECODE, refresh=True)
        row = jnp.zeros(cache.lengths.shape, jnp.int32).at[slots].set(tok)
        logits, cache = Llama(cfg, attention).apply(
            {"params": params}, row[:, None], cache.lengths[:, None], cache, meta)
        return cache, logits[slots, 0]

    return jax.lax.scan(step, cache, tokens.T)[1]


def outputs(policy, tp, dp, monkeypatch, backend=Backend.reference, **options) -> dict:
    """Prefill logits of each prompt's last token, teacher-forced decode logits after the
    first decode chunk, and the greedy tokens (options: `engine`'s)."""
    eng = engine(policy, tp, dp, backend, **options)
    prefill, seen = steps.prefill, []

    def record(*args):
        logits, cache = prefill(*args)
        seen.append((np.asarray(args[6]), np.asarray(logits)))
        return logits, cache

    monkeypatch.setattr(steps, "prefill", record)
    ids = eng.add_requests(PROMPTS, SamplingParams(max_tokens=20))
    done = {out.request_id: out for out in eng.step() if out.finished}  # prefill, decode chunk
    slots = [r.slot for i in ids for r in eng.scheduler.running if r.request_id == i]
    decode = forced_logits(eng.model_cfg, eng.attention, eng.params, eng.cache, jnp.asarray(slots),
                           jnp.asarray(FORCED), jnp.asarray(eng.modes))
    while eng.has_unfinished():
        done.update({out.request_id: out for out in eng.step() if out.finished})
    by_slot = {int(s): row for slots, logits in seen for s, row in zip(slots, logits)}
    return {"tokens": [done[i].outputs[0].token_ids for i in ids],
            "prefill": np.stack([by_slot[s] for s in slots]),  # by request
            "decode": np.asarray(decode), "engine": eng}


@functools.cache
def _single(policy):
    with pytest.MonkeyPatch.context() as mp:
        return outputs(policy, 1, 1, mp)


def close(a, b) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


@pytest.mark.parametrize("policy,tp,dp,shard_vocab", CASES, ids=[
    f"{p}-tp{t}dp{d}" + ("" if v else "-whole_vocab") for p, t, d, v in CASES])
def test_parallel_engine_equals_one_device(policy, tp, dp, shard_vocab, monkeypatch):
    one = _single(policy)
    many = outputs(policy, tp, dp, monkeypatch, shard_vocab=shard_vocab)
    assert many["tokens"] == one["tokens"]
    assert one["decode"].shape == (6, 3, CFG.vocab_size) and np.isfinite(one["decode"]).all()
    assert close(many["decode"], one["decode"]) < TOLERANCE["float32"]
    assert close(many["prefill"], one["prefill"]) < TOLERANCE["float32"]
    if dp > 1:
        check_shardings(many["engine"])


def check_shardings(eng: Engine) -> None:
    """After install, prefill and decode the cache is still split as declared (donation kept
    it in place), and each weight is split on the axis Megatron splits it."""
    specs = cache_specs(eng.cache)
    for leaf, spec in zip(jax.tree.leaves(eng.cache),
                          jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        assert split_as(leaf, eng.mesh, spec)
    layer, mesh = eng.params["layers_0"], eng.mesh
    assert split_as(layer["attn"]["qkv"], mesh, P(None, "tp"))
    assert split_as(layer["attn"]["o"], mesh, P("tp"))
    assert split_as(layer["mlp"]["gate_up"], mesh, P(None, None, "tp"))
    assert split_as(layer["mlp"]["down"], mesh, P("tp"))
    assert split_as(eng.params["lm_head"], mesh, P(None, "tp"))
    assert split_as(eng.params["embed"], mesh, P("tp"))
    assert split_as(layer["attn_norm"]["weight"], mesh, P())
    assert not split_as(layer["attn"]["qkv"], mesh, P())


def split_as(x: jax.Array, mesh, spec: P) -> bool:
    return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)
