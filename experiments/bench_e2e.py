"""End-to-end serving on the Llama-3-8B shape (random bf16 weights, no download): per-token
decode latency, time to first token and KV memory for dense, LServe, DuoAttention and Quest.

Decode: the cache is filled with random K/V for `context` tokens plus exact page statistics
(no real prefill: it would only cost time); then the engine's jitted decode loop
(`lax.while_loop`, cache donated) runs `--steps` tokens and the mean per token is reported,
with the floor = (weights + the KV the policy must read) / 4.3 TB/s (query-head selection:
the union of each group's lists, as the loop left them). A configuration whose
pool does not fit next to the weights is reported as out of memory without allocating it.
TTFT: `Engine.generate(max_new_tokens=1)` on random prompts (chunked when longer than
`--chunk`), after a same-shape warm-up. `--vary MIN_PAGES_PER_SPLIT=2,4,8` repeats the decode
rows with a kernel constant at each value (one process: on a fresh H200 this script takes ~2
minutes to reach its first row, so sweeping by relaunching wastes the budget); `--rows` lists
decode rows one by one instead (`lserve:1x262144:MIN_PAGES_PER_SPLIT=4` ...), in that order.
`--profile [TOP]` adds each row's TOP (20) kernels from one more profiled run;
`--prefill-kernel composite windowed` times the sparse policies' TTFT once per prefill path.

    python experiments/bench_e2e.py --pattern ../shared/duo_patterns/Llama-3-8B-Instruct-Gradient-1048k
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from lserve_jax.config import CacheConfig, ModelConfig, RunConfig, SparsityConfig
from lserve_jax.engine import Engine, decode
from lserve_jax.model.llama import init_params
from lserve_jax.sparsity.heads import load_gates
from lserve_jax.sparsity.policy import SELECT, attended_tokens
from pallas_kernels.page_select import kernel as select_kernel
from pallas_kernels.sparse_decode import kernel as decode_kernel
from pallas_kernels.sparse_decode import merge as decode_merge

DECODE = [(1, t) for t in (16384, 32768, 65536, 131072, 262144)] + [
    (b, t) for b in (4, 8) for t in (32768, 65536, 131072)]
TTFT = (32768, 65536, 131072)
HBM = 139 * 2**30  # usable device memory on the H200


# policies under another name with one default changed: LServe selects pages per query head;
# `lserve_kv` selects once per KV head (scores summed over the group), so a GQA group reads each
# selected page once (the testbed's accuracy: README, knob sweeps)
VARIANTS = {"lserve_kv": ("lserve", {"selection_granularity": "kv_head"})}


def policies(names, chunk: int) -> dict[str, SparsityConfig]:
    base = SparsityConfig(prefill_chunk=chunk)
    configs = {}
    for name in names:
        policy, changes = VARIANTS.get(name, (name, {}))
        configs[name] = dataclasses.replace(base.for_policy(policy), **changes)
    return configs


def fill(engine: Engine, batch: int, context: int, key) -> None:
    """Random K/V for `context` tokens per row, exact statistics, page tables reserved."""
    table = np.zeros(engine.cache.page_table.shape, np.int32)
    for row in range(batch):
        table[row] = engine.pages.reserve(engine.cache_cfg.max_seq_len)[0]
    cache = engine.cache
    k, v, kmin, kmax = _randomise(cache.k, cache.v, cache.kmin, cache.kmax, key,
                                  engine.sparsity.dynamic)
    engine.cache = dataclasses.replace(
        cache, k=k, v=v, kmin=kmin, kmax=kmax, page_table=jnp.asarray(table),
        lengths=jnp.full((cache.lengths.shape[0],), context, jnp.int32))


@functools.partial(jax.jit, static_argnums=(5,), donate_argnums=(0, 1, 2, 3))
def _randomise(k, v, kmin, kmax, key, stats: bool):
    """Fills the pools in place, 8192 pages at a time (a whole-pool random draw would need
    several pools of temporaries), with each page's exact min/max when `stats`."""
    chunk = min(k.shape[0], 8192)

    def body(i, pools):
        k, v, kmin, kmax = pools
        start = jnp.minimum(i * chunk, k.shape[0] - chunk)
        kk, kv = jax.random.split(jax.random.fold_in(key, i))
        keys = jax.random.normal(kk, (chunk, *k.shape[1:]), k.dtype)
        k = jax.lax.dynamic_update_slice(k, keys, (start, 0, 0))
        v = jax.lax.dynamic_update_slice(
            v, jax.random.normal(kv, (chunk, *v.shape[1:]), v.dtype), (start, 0, 0))
        if stats:
            rows = keys.reshape(chunk, kmin.shape[1], -1, k.shape[2])
            kmin = jax.lax.dynamic_update_slice(kmin, rows.min(axis=2), (start, 0, 0))
            kmax = jax.lax.dynamic_update_slice(kmax, rows.max(axis=2), (start, 0, 0))
        return k, v, kmin, kmax

    return jax.lax.fori_loop(0, -(-k.shape[0] // chunk), body, (k, v, kmin, kmax))


def decode_row(cfg, params, weights, name, sparsity, gates, batch, context, steps, backend,
               profile: int = 0):
    max_seq = context + steps + 8
    probe = Engine(cfg, params, sparsity, CacheConfig(max_seq_len=max_seq, max_batch=1,
                                                      num_pages=2), gates)
    needed = weights + batch * probe.kv_bytes_per_sequence(max_seq)
    row = {"name": f"decode_{name}", "policy": name, "batch": batch, "context": context,
           "kv_bytes_per_seq": probe.kv_bytes_per_sequence(context)}
    if needed > HBM:
        return {**row, "error": f"out of memory: needs {needed / 2**30:.0f} GiB"}
    engine = Engine(cfg, params, sparsity, CacheConfig(max_seq_len=max_seq, max_batch=batch),
                    gates)
    fill(engine, batch, context, jax.random.key(context + batch))
    modes = jnp.asarray(engine.modes)
    args = (jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool), modes,
            jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.asarray([-1], jnp.int32))
    timings = []
    for n in (steps,) * 3:  # compile, warm-up, then the timed loop (same static shape)
        cache = dataclasses.replace(engine.cache, lengths=jnp.full((batch,), context, jnp.int32))
        start = time.perf_counter()
        out, _, engine.cache = decode(cfg, sparsity, backend, n + 1, params, cache, *args)
        jax.block_until_ready(out)
        timings.append(1e3 * (time.perf_counter() - start) / n)
    tokens, pages = read_tokens(engine, context, sparsity)
    if pages is not None:
        row["select_pages_read"] = pages
    read = batch * tokens * cfg.kv_bytes_per_token
    if profile:  # one more loop of `steps` tokens under the profiler: its `profile` top kernels
        def once(cache):
            cache = dataclasses.replace(cache, lengths=jnp.full((batch,), context, jnp.int32))
            return (decode(cfg, sparsity, backend, steps + 1, params, cache, *args)[2],)

        summary, (engine.cache,) = benchlib.kernel_summary(once, engine.cache, steps=1,
                                                           top=profile)
        row["kernels_per_loop_of_steps"] = summary
    return {**row, "ms": round(timings[-1], 3),
            "compile_s": round((timings[0] - timings[-1]) * steps / 1e3, 1),
            "floor_ms": round(benchlib.floor_ms(weights + read), 3),
            "peak_gib": round(_peak() / 2**30, 1)}


def read_tokens(engine: Engine, context: int, sparsity: SparsityConfig):
    """(keys per (layer, KV head) one step must read, mean; pages a selecting head reads, mean,
    or None). As `attended_tokens`, except that a selecting head with a list per query head
    reads the union of its lists, counted from the lists the decode loop left in the cache (on
    random data they barely overlap, so the union is near G lists)."""
    mean = attended_tokens(engine.modes, context, sparsity)
    select = np.asarray(engine.modes) == SELECT  # [L, K]
    lists = np.asarray(engine.cache.selected).transpose(0, 2, 1, 3, 4)[select]  # [n, B, Gs, W]
    if lists.size == 0 or -(-context // sparsity.page_size) <= sparsity.budget_pages:
        return mean, None
    union = np.mean([np.unique(x[x >= 0]).size for x in lists.reshape(-1, np.prod(
        lists.shape[2:]))]) + 1  # + the current page
    mean += float(select.mean()) * (union - sparsity.budget_pages) * sparsity.page_size
    return mean, round(float(union), 1)


def ttft_row(cfg, params, name, sparsity, gates, context, backend, profile: int = 0,
             prefill_kernel: str = RunConfig.prefill_kernel):
    engine = Engine(cfg, params, sparsity, CacheConfig(max_seq_len=context + 128, max_batch=1),
                    gates)
    prompt = np.random.default_rng(context).integers(0, cfg.vocab_size, context).tolist()
    run = RunConfig(max_new_tokens=1, backend=backend, prefill_kernel=prefill_kernel)
    start = time.perf_counter()
    engine.generate([prompt], run)  # compile
    first = time.perf_counter() - start
    start = time.perf_counter()
    engine.generate([prompt], run)
    ms = 1e3 * (time.perf_counter() - start)
    row = {"name": f"ttft_{name}", "policy": name, "batch": 1, "context": context,
           "ms": round(ms, 1), "compile_s": round(first - ms / 1e3, 1),
           "peak_gib": round(_peak() / 2**30, 1), "prefill_kernel": prefill_kernel}
    if profile:
        def once():
            engine.generate([prompt], run)
            return ()

        row["kernels"] = benchlib.kernel_summary(once, steps=1, top=profile)[0]
    return row


KNOBS = {  # kernel constants that --vary may set (read when a kernel is traced)
    "MIN_PAGES_PER_SPLIT": decode_kernel, "MIN_PROGRAMS": decode_kernel,
    "NUM_WARPS": decode_kernel, "NUM_STAGES": decode_kernel,
    "TOPK_WARPS": select_kernel, "TOPK_CHUNK": select_kernel,
    "MERGE_CHUNK": decode_merge, "MERGE_BLOCK_H": decode_merge,
}


def parse_vary(spec: str) -> list[tuple[str, int]]:
    """'NAME=V1,V2' -> [(NAME, V1), (NAME, V2)] for a NAME of KNOBS."""
    name, _, values = spec.partition("=")
    if name not in KNOBS or not values:
        raise SystemExit(f"--vary {spec!r}: use NAME=V1,V2,... with NAME one of {sorted(KNOBS)}")
    return [(name, int(v)) for v in values.split(",")]


def parse_row(spec: str) -> tuple[str, int, int, tuple[str, int] | None]:
    """'lserve:4x131072' or 'lserve:4x131072:TOPK_WARPS=8' -> (policy, batch, context, knob)."""
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError(spec)
        batch, context = (int(x) for x in parts[1].split("x"))
    except ValueError:
        raise SystemExit(f"--rows {spec!r}: use POLICY:BATCHxCONTEXT[:NAME=VALUE]") from None
    return parts[0], batch, context, parse_vary(parts[2])[0] if len(parts) == 3 else None


def with_knob(fn, knob: tuple[str, int] | None):
    """`fn` run with a kernel constant of KNOBS at a value (None: as it is); jit caches are
    cleared around it so the decode loop is traced again with the new value."""
    if knob is None:
        return fn
    name, value = knob
    module = KNOBS[name]

    @functools.wraps(fn)
    def run(*args):
        saved = getattr(module, name)
        setattr(module, name, value)
        jax.clear_caches()
        try:
            return {**fn(*args), "knob": f"{name}={value}"}
        finally:
            setattr(module, name, saved)
            jax.clear_caches()

    return run


def capacity_row(cfg, params, weights, name, sparsity, gates, context, headroom=8 * 2**30):
    """The largest batch whose pool fits beside the weights (computed from the allocator)."""
    probe = Engine(cfg, params, sparsity, CacheConfig(max_seq_len=context, max_batch=1,
                                                      num_pages=2), gates)
    per_seq = probe.kv_bytes_per_sequence(context)
    return {"name": f"capacity_{name}", "policy": name, "context": context,
            "kv_gib_per_seq": round(per_seq / 2**30, 2),
            "max_batch_computed": int((HBM - weights - headroom) // per_seq)}


def _peak() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", required=True, help="DuoAttention pattern of the model")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", default="llama3-8b", help="'tiny' for a CPU smoke run")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=0,
                        help="prefill chunk for TTFT (0: one prefill; 128K fits unchunked)")
    parser.add_argument("--profile", type=int, nargs="?", const=20, default=0, metavar="TOP",
                        help="kernel summary of every row: its TOP (default 20) kernels")
    parser.add_argument("--policies", nargs="+", default=["dense", "lserve", "duo", "quest"])
    parser.add_argument("--backend", default="pallas")
    parser.add_argument("--decode", nargs="*", default=None, help="BATCHxCONTEXT ...")
    parser.add_argument("--ttft", type=int, nargs="*", default=list(TTFT))
    parser.add_argument("--prefill-kernel", nargs="+", default=[RunConfig.prefill_kernel],
                        choices=("fused", "composite", "windowed"),
                        help="TTFT rows of the sparse policies once per prefill path")
    parser.add_argument("--vary", default=None, metavar="NAME=V1,V2",
                        help=f"decode rows once per value of a kernel constant: {sorted(KNOBS)}")
    parser.add_argument("--rows", nargs="+", default=None, metavar="POLICY:BxT[:NAME=V]",
                        help="these decode rows in this order instead of the --decode x "
                             "--policies (x --vary) grid, e.g. lserve:1x262144:TOPK_WARPS=8")
    args = parser.parse_args()
    cfg = ModelConfig.from_name(args.model)
    gates = load_gates(args.pattern)[: cfg.n_layers, : cfg.n_kv_heads]
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    weights = sum(x.nbytes for x in jax.tree.leaves(params)) - params["embed"].nbytes
    shapes = DECODE if args.decode is None else [tuple(map(int, s.split("x"))) for s in args.decode]
    listed = [parse_row(spec) for spec in args.rows or []]
    configs = policies(dict.fromkeys(args.policies + [r[0] for r in listed]), args.chunk)
    if not listed:  # shape by shape, every policy next to each other (partial runs compare)
        listed = [(name, b, t, knob) for knob in (parse_vary(args.vary) if args.vary else [None])
                  for b, t in shapes for name in args.policies]
    jobs = [(name, with_knob(decode_row, knob), (cfg, params, weights, name, configs[name],
                                                 gates, b, t, args.steps, args.backend,
                                                 args.profile))
            for name, b, t, knob in listed]
    for t in args.ttft:
        jobs += [(name, ttft_row, (cfg, params, name, configs[name], gates, t, args.backend,
                                   args.profile, kernel)) for name in args.policies
                 for kernel in (args.prefill_kernel[:1] if name == "dense" else
                                args.prefill_kernel)]
    jobs += [(name, capacity_row, (cfg, params, weights, name, configs[name], gates, t))
             for t in (131072, 262144) for name in args.policies]
    rows = []
    for name, fn, job in jobs:
        print(f"{time.strftime('%H:%M:%S')} {fn.__name__} {name} ...", flush=True)
        try:
            row = fn(*job)
        except Exception as err:  # noqa: BLE001 - report it as a row; keep measuring the rest
            row = {"name": f"{fn.__name__}_{name}", "policy": name, "error": repr(err)[:300]}
        rows.append(row)
        print(row, flush=True)
        benchlib.write_results("e2e", _with_baselines(rows), args.out,
                               model=f"{args.model}, random {cfg.dtype} weights",
                               cache="random K/V + exact page statistics (decode rows)",
                               ttft_chunk=args.chunk)


def _with_baselines(rows: list[dict]) -> list[dict]:
    """speedup against the dense row of the same kind, shape and knob value, where both exist."""
    def key(r):
        return (r["name"].split("_")[0], r.get("batch"), r.get("context"),
                r.get("knob"))

    dense = {key(r): r.get("ms") for r in rows if r.get("policy") == "dense"}
    out = []
    for r in rows:
        base = dense.get(key(r))
        extra = {"baseline_ms": base, "speedup": round(base / r["ms"], 2)} if (
            base and r.get("ms")) else {}
        out.append({**r, **extra})
    return out


if __name__ == "__main__":
    main()
