"""Per-token dense decode latency of the whole Llama-3-8B shape (random bf16 weights) on the
paged cache, against the floor: weight + KV bytes over the device's copy bandwidth, measured at
the start of the run (benchlib.measure_device).

The cache is filled with random K/V for `context` tokens (a real prefill would only cost time);
each row then decodes greedily. One jitted, cache-donating decode step is timed per token
(median of `--steps` after warm-up), and the same steps inside the engine's `lax.while_loop`
give the loop's mean per token. `--model tiny --backends reference --shapes 1x256` is a CPU
smoke run.

    python experiments/bench_dense_decode.py [--out DIR] [--backends reference cudnn pallas]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from lserve_jax.attention import PagedAttention
from lserve_jax.cache.allocator import PageAllocator, SequencePages
from lserve_jax.cache.paged import empty_cache
from lserve_jax.config import Backend, SparsityConfig
from lserve_jax.engine import DecodeState, decode, decode_step
from lserve_jax.model import load_model
from lserve_jax.model.llama import Llama
from lserve_jax.sparsity.policy import STREAM, head_modes

SHAPES = [(1, 4096), (8, 4096), (1, 32768), (8, 32768)]  # (batch, context)


def param_bytes(params, skip_embedding: bool) -> int:
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return total - (params["embed"].nbytes if skip_embedding else 0)


def filled_cache(cfg, sparsity, batch, context, steps, key):
    """A pool holding `context` random tokens per row, pages laid out by the allocator."""
    modes = head_modes(cfg, sparsity)
    max_pages = -(-(context + steps) // sparsity.page_size)
    per_seq = cfg.n_layers * cfg.n_kv_heads * max_pages
    pages = SequencePages(PageAllocator(1 + batch * per_seq), modes == STREAM, sparsity,
                          max_pages)
    table = np.stack([pages.reserve(context + steps)[0] for _ in range(batch)])
    cache = empty_cache(cfg, sparsity, num_pages=1 + batch * per_seq, batch=batch,
                        max_pages=max_pages)
    k1, k2 = jax.random.split(key)
    rand = jax.jit(lambda k, like: jax.random.normal(k, like.shape, like.dtype))
    return dataclasses.replace(
        cache, k=rand(k1, cache.k), v=rand(k2, cache.v), page_table=jnp.asarray(table),
        lengths=jnp.full((batch,), context, jnp.int32)), jnp.asarray(modes)


def run(cfg, params, backend, batch, context, steps, profile=False, hlo=None):
    sparsity = SparsityConfig(policy="dense")
    cache, modes = filled_cache(cfg, sparsity, batch, context, steps + 8, jax.random.key(1))
    attention = PagedAttention(sparsity, backend)
    model = Llama(cfg, attention)
    args = (modes, jnp.asarray([-1], jnp.int32), jnp.float32(0), jnp.float32(1))
    state = DecodeState(out=jnp.zeros((batch, steps + 8), jnp.int32),
                        count=jnp.ones((batch,), jnp.int32),
                        done=jnp.zeros((batch,), bool), key=jax.random.key(2))
    step = jax.jit(functools.partial(decode_step, model), donate_argnums=(1,)).lower(
        params, cache, state, *args).compile()
    memory = step.memory_analysis()  # in-place cache update: temp << cache bytes
    if hlo:  # the optimised HLO, to map the profile's fusion names to what they compute
        pathlib.Path(hlo).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(hlo) / f"step_{backend}_{batch}x{context}.hlo.txt").write_text(step.as_text())
    samples = []
    for i in range(steps + 3):
        start = time.perf_counter()
        cache, state = step(params, cache, state, *args)
        jax.block_until_ready(state.out)
        if i >= 3:
            samples.append(1e3 * (time.perf_counter() - start))
    kernels = None
    if profile:
        kernels, (cache, state) = benchlib.kernel_summary(
            lambda c, s: step(params, c, s, *args), cache, state)
    cache = dataclasses.replace(cache, lengths=jnp.full((batch,), context, jnp.int32))
    loop = functools.partial(decode, cfg, attention, steps + 1)
    first = jnp.zeros((batch,), jnp.int32)
    live = jnp.ones((batch,), bool)
    out, count, cache = loop(params, cache, first, live, modes, jax.random.key(3), *args[2:],
                             args[1])  # compile
    jax.block_until_ready(out)
    cache = dataclasses.replace(cache, lengths=jnp.full((batch,), context, jnp.int32))
    start = time.perf_counter()
    out, count, cache = loop(params, cache, first, live, modes, jax.random.key(3), *args[2:],
                             args[1])
    jax.block_until_ready(out)
    loop_ms = 1e3 * (time.perf_counter() - start) / steps
    finite = bool(jnp.all(jnp.isfinite(cache.k[1:2])))
    return statistics.median(samples), loop_ms, finite, memory, kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="results folder (default: experiments/results/<device>)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--backends", nargs="+", type=Backend, choices=list(Backend),
                        default=[Backend.cudnn, Backend.pallas])
    parser.add_argument("--model", default="llama3-8b", help="a preset; 'tiny' for a CPU smoke run")
    parser.add_argument("--shapes", nargs="+", default=None, help="BATCHxCONTEXT, e.g. 1x4096")
    parser.add_argument("--hlo", default=None, help="write each compiled step's HLO here")
    parser.add_argument("--profile", action="store_true",
                        help="add each row's device-kernel summary (JAX profiler trace)")
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    facts = benchlib.measure_device()  # before the weights: the probe needs free memory
    model = load_model(args.model)
    cfg, params = model.config, model.params
    weights = param_bytes(params, skip_embedding=True)
    rows = []
    for backend in args.backends:
        for batch, context in shapes:
            kv = batch * context * cfg.kv_bytes_per_token
            floor = facts.floor_ms(weights + kv)
            try:
                ms, loop_ms, finite, memory, kernels = run(cfg, params, backend, batch,
                                                           context, args.steps, args.profile,
                                                           args.hlo)
            except Exception as err:  # report the failure as a row, keep measuring the rest
                rows.append({"name": f"dense_decode_{backend}", "shape": [batch, context],
                             "error": f"{type(err).__name__}: {str(err)[:300]}"})
                print(rows[-1])
                continue
            rows.append({"name": f"dense_decode_{backend}", "backend": str(backend),
                         "shape": [batch, context], "batch": batch, "context": context,
                         "ms": round(ms, 4), "loop_ms": round(loop_ms, 4),
                         "floor_ms": round(floor, 4), "ratio_to_floor": round(ms / floor, 3),
                         "weight_bytes": weights, "kv_bytes": kv, "finite": finite,
                         "step_temp_bytes": memory.temp_size_in_bytes,
                         "step_alias_bytes": memory.alias_size_in_bytes,
                         **({"kernels": kernels} if kernels else {})})
            print(rows[-1], flush=True)
            benchlib.write_results("dense_decode", rows, args.out, facts, steps=args.steps,
                                   model=f"{args.model} (random {cfg.dtype} weights)")


if __name__ == "__main__":
    main()
