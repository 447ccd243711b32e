r"""Tensor-parallel decode: per-token latency of the engine's jitted decode loop at TP = 1, 2,
4, 8 GPUs (`ParallelConfig.tp`) for dense and LServe, on the Llama-3-8B and Llama-3-70B shapes
(random bf16 weights made on the mesh, no download), at long contexts.

Each row builds an engine on a mesh of `tp` devices, fills its cache with random K/V for
`context` tokens plus exact page statistics (each device its own pages), and times the decode
loop (`engine.steps.decode`, cache donated): compile, warm-up, then `--steps` tokens. Rows
report ms per token (`compile_s`: the first call's seconds, compilation and one loop), the scaling against TP = 1 of the same policy and context (`vs_tp1`,
where one device holds the model) and LServe against dense at the same TP (`vs_dense`). The
floor per device is (its weights + the KV its heads must read) / the bandwidth measured on
device 0. `--tp 1 --one-device-mesh` runs TP = 1 through the mesh path (shard_map over a 1 x 1
mesh) beside the plain one: the same kernels, so the times must agree.

    python experiments/bench_tp.py --model llama3-8b --tp 1 2 --contexts 32768 131072 \
        --pattern ../shared/duo_patterns/Llama-3-8B-Instruct-Gradient-1048k
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import benchlib
from experiments.bench_e2e import _randomise, read_tokens
from lserve_jax.cache.allocator import kv_bytes_per_token
from lserve_jax.cache.paged import cache_specs
from lserve_jax.config import Backend, CacheConfig, ModelConfig, ParallelConfig, SparsityConfig
from lserve_jax.engine import Engine, steps
from lserve_jax.model.llama import init_params
from lserve_jax.parallel import DP, PAGES, TP, make_mesh, param_spec, shardings
from lserve_jax.sparsity.heads import load_gates


MESH_ONE = "1x1 (shard_map)"  # TP = 1 through the mesh path


def random_params(cfg: ModelConfig, mesh: Mesh | None, parallel: ParallelConfig, seed: int):
    """Random weights made where they live (a 70B model fits no single device): each weight
    drawn on the mesh with its own split (already in device order: they are random)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(seed)))
    if mesh is None:
        return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))
    specs = jax.tree.map_with_path(
        lambda path, x: param_spec(path[-1].key, x.ndim, False, parallel), shapes)
    return jax.jit(init_params, static_argnums=0, out_shardings=shardings(specs, mesh))(
        cfg, jax.random.key(seed))


def one_device_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), (DP, TP))


def fill(engine: Engine, batch: int, context: int, key) -> None:
    """Random K/V for `context` tokens per row and exact statistics, each device filling its
    own block of pages; page tables reserved by the engine's allocator."""
    table = np.zeros(engine.cache.page_table.shape, np.int32)
    for row in range(batch):
        table[row] = engine.pages.reserve(engine.cache_cfg.max_seq_len)[0]
    cache, mesh = engine.cache, engine.attention.mesh
    pools = (cache.k, cache.v, cache.kmin, cache.kmax)
    if mesh is None:
        pools = _randomise(*pools, key, engine.sparsity.dynamic)
    else:
        pools = _randomise_per_device(pools, key, mesh, engine.sparsity.dynamic)
    specs = cache_specs(cache)
    place = (lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))) if mesh else (
        lambda x, spec: jnp.asarray(x))
    engine.cache = dataclasses.replace(
        cache, k=pools[0], v=pools[1], kmin=pools[2], kmax=pools[3],
        page_table=place(table, specs.page_table),
        lengths=place(np.full(batch, context, np.int32), specs.lengths))


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=(0,))
def _randomise_per_device(pools, key, mesh, stats):
    def local(key, *pools):
        return _randomise(*pools, jax.random.fold_in(key, jax.lax.axis_index((DP, TP))), stats)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), *[PAGES] * 4),
                         out_specs=(PAGES,) * 4, check_vma=False)(key, *pools)


def decode_row(cfg, params, sparsity, gates, facts, args, tp: int, context: int,
               mesh_one: bool = False) -> dict:
    r = sparsity.reuse_steps
    n_steps = -(-args.steps // r) * r
    parallel = ParallelConfig(tp=tp)
    engine = Engine(cfg, None, sparsity, CacheConfig(max_seq_len=context + n_steps + 8,
                                                     max_batch=args.batch),
                    gates, backend=args.backend, parallel=parallel)
    if mesh_one:
        engine.attention = dataclasses.replace(engine.attention, mesh=one_device_mesh())
        engine.cache = jax.device_put(engine.cache, shardings(cache_specs(engine.cache),
                                                              engine.attention.mesh))
    engine.params = params
    fill(engine, args.batch, context, jax.random.key(context))
    state, modes = steps.SlotState.greedy(args.batch), jnp.asarray(engine.modes)
    lengths = np.asarray(engine.cache.lengths)  # each loop starts at `context` again
    timings = []
    for _ in range(3):  # compile, warm-up, timed
        start_cache = dataclasses.replace(engine.cache, lengths=jax.device_put(
            lengths, engine.cache.lengths.sharding))
        start = time.perf_counter()
        out, _, cache = steps.decode(cfg, engine.attention, n_steps, params, start_cache,
                                     state, modes)
        jax.block_until_ready(out)
        engine.cache = cache
        timings.append(1e3 * (time.perf_counter() - start) / n_steps)
    tokens, pages = read_tokens(engine, context, sparsity)
    weights = sum(x.nbytes for x in jax.tree.leaves(params)) - params["embed"].nbytes
    kv = args.batch * tokens * kv_bytes_per_token(cfg)
    row = {"policy": sparsity.policy, "tp": tp, "batch": args.batch, "context": context,
           "ms": round(timings[-1], 3), "compile_s": round(timings[0] * n_steps / 1e3, 1),
           "floor_ms": round(facts.floor_ms((weights + kv) / tp), 3),
           "mesh": MESH_ONE if mesh_one else ("none" if tp == 1 else f"1x{tp}")}
    return {**row, **({"select_pages_read": pages} if pages is not None else {})}


def with_ratios(rows: list[dict]) -> list[dict]:
    """vs_tp1: the TP = 1 row of the same policy and context over this one; vs_dense: the dense
    row of the same TP and context over this one."""
    def ms(policy, tp, context):
        return next((r["ms"] for r in rows if r.get("ms") and r["policy"] == policy and
                     r["tp"] == tp and r["context"] == context and r["mesh"] != MESH_ONE),
                    None)

    out = []
    for r in rows:
        extra = {}
        if r.get("ms"):
            one, dense = ms(r["policy"], 1, r["context"]), ms("dense", r["tp"], r["context"])
            extra = {k: round(v / r["ms"], 2) for k, v in (("vs_tp1", one), ("vs_dense", dense))
                     if v}
        out.append({**r, **extra})
    return out


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b", help="a preset (llama3-70b, tiny ...)")
    parser.add_argument("--pattern", default=None,
                        help="DuoAttention pattern (default: seeded random gates)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--policies", nargs="+", default=["dense", "lserve"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--backend", type=Backend, default=Backend.pallas, choices=list(Backend))
    parser.add_argument("--one-device-mesh", action="store_true",
                        help="TP = 1 rows also through shard_map over a 1 x 1 mesh")
    parser.add_argument("--out", default=None, help="results folder (default: the device's)")
    parser.add_argument("--name", default="tensor_parallel")
    args = parser.parse_args(argv)
    facts = benchlib.measure_device()
    cfg = ModelConfig.from_name(args.model)
    if args.pattern:
        gates = load_gates(args.pattern)[: cfg.n_layers, : cfg.n_kv_heads]
    else:
        gates = np.random.default_rng(0).random((cfg.n_layers, cfg.n_kv_heads))
    rows: list[dict] = []
    for tp in args.tp:
        parallel = ParallelConfig(tp=tp)
        params = random_params(cfg, make_mesh(parallel), parallel, seed=0)
        for context in args.contexts:
            for name in args.policies:
                for mesh_one in (False, True) if tp == 1 and args.one_device_mesh else (False,):
                    print(f"{time.strftime('%H:%M:%S')} tp={tp} {name} {context}", flush=True)
                    try:
                        row = decode_row(cfg, params, SparsityConfig().for_policy(name), gates,
                                         facts, args, tp, context, mesh_one)
                    except Exception as err:  # noqa: BLE001 - a row of its own
                        row = {"policy": name, "tp": tp, "context": context,
                               "error": repr(err)[:300]}
                    rows.append(row)
                    print(row, flush=True)
                    benchlib.write_results(args.name, with_ratios(rows), args.out, facts,
                                           model=f"{args.model}, random {cfg.dtype} weights",
                                           devices=jax.device_count())
        del params
    print("wrote", benchlib.results_dir(args.out) / f"{args.name}.json")


if __name__ == "__main__":
    main()
