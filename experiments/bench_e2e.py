r"""End-to-end serving on the Llama-3-8B shape (random bf16 weights, no download): per-token
decode latency, time to first token and KV memory for dense, LServe, DuoAttention and Quest.

Decode: the cache is filled with random K/V for `context` tokens plus exact page statistics
(no real prefill: it would only cost time); then the engine's jitted decode loop
(`engine.steps.decode`, cache donated) runs `--steps` tokens and the mean per token is reported,
with the floor = (weights + the KV the policy must read) / the device's copy bandwidth,
measured at the start of the run (query-head selection: the union of each group's lists, as
the loop left them). A configuration whose pool does not fit next to the weights in the
device's memory (its `bytes_limit`) is reported as out of memory without allocating it.
TTFT: `Engine.generate` of one token on random prompts (chunked when longer than
`--chunk`), after a same-shape warm-up.
`--vary decode.min_pages_per_split=2,4,8` repeats the decode rows once per value of a kernel
tuning knob (a `KernelTuning` handed to the engine; rows say `"tuning": "KNOB=V"`), in one
process, since reaching the first row takes minutes of compilation; `--rows` lists decode rows
one by one instead (`lserve:1x262144:decode.min_pages_per_split=4` ...), in that order.
`--profile [TOP]` adds each row's TOP (20) kernels from one more profiled run;
`--prefill-kernel composite windowed` times the sparse policies' TTFT once per prefill path.
`--precision auto/auto auto/int8 fp8/int8` repeats the rows per WEIGHTS/KV precision (FP8
weights: the bf16 weights quantized in the process; a quantized KV cache: random codes and
scales); FP8-weight decode rows also list the GEMM calls of the compiled decode loop
(`gemms`) and its temporary bytes (`temp_bytes`: a bf16 copy of a weight made per step would
show there).

    python experiments/bench_e2e.py \
        --pattern ../shared/duo_patterns/Llama-3-8B-Instruct-Gradient-1048k
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from experiments.benchlib import DeviceFacts, Setting
from lserve_jax.attention import PagedAttention
from lserve_jax.config import (WEIGHT_DTYPES, Backend, CacheConfig, ModelConfig, PrefillPath,
                               RunConfig)
from lserve_jax.config import SparsityConfig
from lserve_jax.cache.allocator import kv_bytes_per_token
from lserve_jax.engine import Engine, steps
from lserve_jax.model.quant import quantize_params
from lserve_jax.sampling import SamplingParams
from lserve_jax.model import load_model
from lserve_jax.sparsity.heads import load_gates
from lserve_jax.sparsity.policy import SELECT, attended_tokens
from pallas_kernels import kv_quant

DECODE = [(1, t) for t in (16384, 32768, 65536, 131072, 262144)] + [
    (b, t) for b in (4, 8) for t in (32768, 65536, 131072)]
TTFT = (32768, 65536, 131072)


# policies under another name with one default changed: LServe selects pages per query head;
# `lserve_kv` selects once per KV head (scores summed over the group), so a GQA group reads each
# selected page once (the testbed's accuracy: README, knob sweeps)
VARIANTS = {"lserve_kv": ("lserve", {"selection_granularity": "kv_head"})}


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every row of one run shares."""

    cfg: ModelConfig
    params: dict
    weights: int  # bytes a decode step reads of the parameters (all but the embedding)
    gates: np.ndarray  # [L, K] DuoAttention gates
    facts: DeviceFacts  # measured bandwidth and memory of the device
    backend: Backend
    steps: int  # decode tokens timed per row
    profile: int = 0  # kernels listed per row (0: no profile)
    kv_dtype: str = "auto"  # CacheConfig.kv_dtype of every row
    allocate: bool = False  # capacity rows allocate the pool they compute

    @property
    def precision(self) -> dict:
        return {"weights": self.cfg.weight_dtype, "kv_dtype": self.kv_dtype}

    def cache(self, **fields) -> CacheConfig:
        return CacheConfig(kv_dtype=self.kv_dtype, **fields)


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
    several pools of temporaries), with each page's exact min/max when `stats`. Quantized
    pools get the codes of the random values (a static format: under a scale of 4 / qmax per
    row, so the values' few-sigma range fits)."""
    pages, chunk = k.shape[0], min(k.shape[0], 8192)
    kind = kv_quant.pool_kind(k)
    if kind in kv_quant.STATIC:
        fixed = 4.0 / (127.0 if kind == "int8" else kv_quant.FP8_MAX)
        k, v = (dataclasses.replace(x, scale=jnp.full(x.scale.shape, fixed)) for x in (k, v))

    def put(pool, values, start):
        if kind == "auto":
            return jax.lax.dynamic_update_slice(pool, values.astype(pool.dtype), (start, 0, 0))
        if kind in kv_quant.STATIC:
            codes = kv_quant.quantize_static(values, pool.scale.reshape(-1)[0], kind)
            return dataclasses.replace(pool, codes=jax.lax.dynamic_update_slice(
                pool.codes, codes, (start, 0, 0)))
        codes, scale, zero = kv_quant.quantize_token(values, kind)
        return kv_quant.QuantizedPool(
            jax.lax.dynamic_update_slice(pool.codes, codes, (start, 0, 0)),
            jax.lax.dynamic_update_slice(pool.scale, jnp.stack([scale, zero], 1),
                                         (start, 0, 0)), kind)

    def body(i, pools):
        k, v, kmin, kmax = pools
        start = jnp.minimum(i * chunk, pages - chunk)
        kk, kv = jax.random.split(jax.random.fold_in(key, i))
        shape = (chunk, *k.shape[1:])
        keys = jax.random.normal(kk, shape, kmin.dtype)
        k, v = put(k, keys, start), put(v, jax.random.normal(kv, shape, kmin.dtype), start)
        if stats:
            rows = keys.reshape(chunk, kmin.shape[1], -1, shape[2])
            kmin = jax.lax.dynamic_update_slice(kmin, rows.min(axis=2), (start, 0, 0))
            kmax = jax.lax.dynamic_update_slice(kmax, rows.max(axis=2), (start, 0, 0))
        return k, v, kmin, kmax

    return jax.lax.fori_loop(0, -(-pages // chunk), body, (k, v, kmin, kmax))


def decode_loop(engine: Engine, backend: Backend, n_steps: int):
    """The engine's jitted decode chunk of `n_steps` (a multiple of R) under the engine's own
    kernel tuning: (params, cache, *decode_args) -> (tokens, counts, cache)."""
    attention = PagedAttention(engine.sparsity, backend, tuning=engine.attention.tuning)
    return functools.partial(steps.decode, engine.model_cfg, attention, n_steps)


def decode_args(batch: int, modes) -> tuple:
    """(slot state, modes) of a greedy chunk over `batch` rows that never stop."""
    return steps.SlotState.greedy(batch), jnp.asarray(modes)


def decode_row(bench: Bench, name: str, sparsity: SparsityConfig, batch: int, context: int,
               setting: Setting = Setting()) -> dict:
    cfg, reuse = bench.cfg, sparsity.reuse_steps
    n_steps = -(-bench.steps // reuse) * reuse  # a decode chunk runs whole reuse intervals
    max_seq = context + n_steps + 8
    probe = Engine(cfg, bench.params, sparsity, bench.cache(max_seq_len=max_seq, max_batch=1,
                                                            num_pages=2), bench.gates)
    needed = bench.weights + batch * probe.kv_bytes_per_sequence(max_seq)
    row = {"name": f"decode_{name}", "policy": name, **bench.precision, "batch": batch,
           "context": context, "kv_bytes_per_seq": probe.kv_bytes_per_sequence(context),
           **({"tuning": setting.label} if setting.label else {})}
    if needed > bench.facts.memory_bytes:
        return {**row, "error": f"out of memory: needs {needed / 2**30:.1f} GiB of the "
                                f"device's {bench.facts.memory_bytes / 2**30:.1f} GiB"}
    engine = Engine(cfg, bench.params, sparsity, bench.cache(max_seq_len=max_seq,
                                                             max_batch=batch),
                    bench.gates, tuning=setting.tuning)
    fill(engine, batch, context, jax.random.key(context + batch))
    loop, args = decode_loop(engine, bench.backend, n_steps), decode_args(batch, engine.modes)

    def once(cache):
        cache = dataclasses.replace(cache, lengths=jnp.full((batch,), context, jnp.int32))
        return loop(bench.params, cache, *args)

    timings = []
    for _ in range(3):  # compile, warm-up, then the timed loop (same static shape)
        start = time.perf_counter()
        out, _, engine.cache = once(engine.cache)
        jax.block_until_ready(out)
        timings.append(1e3 * (time.perf_counter() - start) / n_steps)
    tokens, pages = read_tokens(engine, context, sparsity)
    if pages is not None:
        row["select_pages_read"] = pages
    read = batch * tokens * kv_bytes_per_token(cfg, bench.kv_dtype)
    if cfg.weight_dtype == "fp8":
        row.update(gemm_report(steps.decode.lower(
            cfg, PagedAttention(sparsity, bench.backend, tuning=engine.attention.tuning),
            n_steps, bench.params, engine.cache, *args).compile()))
    if bench.profile:  # one more loop of `steps` tokens under the profiler: its top kernels
        summary, (engine.cache,) = benchlib.kernel_summary(
            lambda cache: (once(cache)[2],), engine.cache, steps=1, top=bench.profile)
        row["kernels_per_loop_of_steps"] = summary
    return {**row, "ms": round(timings[-1], 3),
            "compile_s": round((timings[0] - timings[-1]) * n_steps / 1e3, 1),
            "floor_ms": round(bench.facts.floor_ms(bench.weights + read), 3),
            "peak_gib": round(_peak() / 2**30, 1)}


def gemm_report(compiled) -> dict:
    """The GEMM custom calls of a compiled function by target (cuBLASLt's FP8 GEMM is
    `__cublas$lt$matmul$f8`; XLA's own Triton GEMMs are fusions and not listed) and its
    temporary bytes: an 8-bit weight converted to bf16 before its GEMM would need a temporary
    of twice the weight's bytes."""
    targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
    return {"gemms": {t: targets.count(t) for t in sorted(set(targets))
                      if "matmul" in t or "gemm" in t},
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def read_tokens(engine: Engine, context: int, sparsity: SparsityConfig):
    """(keys per (layer, KV head) one step must read, mean; pages a selecting head reads, mean,
    or None). As `attended_tokens`, except that a selecting head with a list per query head
    reads the union of its lists and the current page, counted from the lists the decode loop
    left in the cache (on random data they barely overlap, so the union is near G lists)."""
    mean = attended_tokens(engine.modes, context, sparsity)
    select = np.asarray(engine.modes) == SELECT  # [L, K]
    lists = np.asarray(engine.cache.selected).transpose(0, 2, 1, 3, 4)[select]  # [n, B, Gs, W]
    if lists.size == 0 or -(-context // sparsity.page_size) <= sparsity.budget_pages:
        return mean, None
    current = (np.asarray(engine.cache.lengths) - 1) // sparsity.page_size  # [B]
    # the union with the current page, which an anchored selection may already list
    union = np.mean([np.union1d(row[row >= 0], current[b]).size
                     for per_b in lists for b, row in enumerate(per_b.reshape(len(current), -1))])
    mean += float(select.mean()) * (union - sparsity.budget_pages) * sparsity.page_size
    return mean, round(float(union), 1)


def ttft_row(bench: Bench, name: str, sparsity: SparsityConfig, context: int,
             prefill_kernel: PrefillPath) -> dict:
    engine = Engine(bench.cfg, bench.params, sparsity,
                    bench.cache(max_seq_len=context + 128, max_batch=1), bench.gates,
                    backend=bench.backend, prefill_path=prefill_kernel)
    prompt = np.random.default_rng(context).integers(0, bench.cfg.vocab_size, context).tolist()
    run = SamplingParams(max_tokens=1)
    start = time.perf_counter()
    engine.generate([prompt], run)  # compile
    first = time.perf_counter() - start
    start = time.perf_counter()
    engine.generate([prompt], run)
    ms = 1e3 * (time.perf_counter() - start)
    row = {"name": f"ttft_{name}", "policy": name, **bench.precision, "batch": 1,
           "context": context, "ms": round(ms, 1), "compile_s": round(first - ms / 1e3, 1),
           "peak_gib": round(_peak() / 2**30, 1), "prefill_kernel": str(prefill_kernel)}
    if bench.profile:
        def once():
            engine.generate([prompt], run)
            return ()

        row["kernels"] = benchlib.kernel_summary(once, steps=1, top=bench.profile)[0]
    return row


def capacity_row(bench: Bench, name: str, sparsity: SparsityConfig, context: int,
                 headroom: int = 8 * 2**30) -> dict:
    """The largest batch whose pool fits beside the parameters in the device's memory with
    `headroom` to spare (computed from the allocator); with `bench.allocate`, an engine of
    that batch is then built (its pool allocated) to show that it does fit."""
    probe = Engine(bench.cfg, bench.params, sparsity, bench.cache(max_seq_len=context,
                                                                  max_batch=1, num_pages=2),
                   bench.gates)
    per_seq = probe.kv_bytes_per_sequence(context)
    held = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(bench.params))
    batch = max(0, int((bench.facts.memory_bytes - held - headroom) // per_seq))
    row = {"name": f"capacity_{name}", "policy": name, **bench.precision, "context": context,
           "kv_gib_per_seq": round(per_seq / 2**30, 2), "max_batch_computed": batch}
    if bench.allocate and batch:
        try:
            engine = Engine(bench.cfg, bench.params, sparsity,
                            bench.cache(max_seq_len=context, max_batch=batch), bench.gates)
            jax.block_until_ready(engine.cache)
            row["allocated_bytes"] = sum(x.nbytes for x in jax.tree.leaves(engine.cache))
            del engine
        except jax.errors.JaxRuntimeError as err:  # the computed batch did not allocate
            row["allocation_error"] = str(err)[:200]
    return row


def parse_row(spec: str) -> tuple[str, int, int, Setting]:
    """'lserve:4x131072', or with knobs 'lserve:4x131072:select.topk_warps=8[:KNOB=V ...]' ->
    (policy, batch, context, setting)."""
    parts = spec.split(":")
    try:
        batch, context = (int(x) for x in parts[1].split("x"))
        knobs = dict(part.split("=") for part in parts[2:])
        values = {name: int(value) for name, value in knobs.items()}
    except (IndexError, ValueError):
        raise SystemExit(f"--rows {spec!r}: use POLICY:BATCHxCONTEXT[:GROUP.KNOB=VALUE ...], "
                         "e.g. lserve:1x262144:decode.min_pages_per_split=4") from None
    return parts[0], batch, context, benchlib.setting(values, f"--rows {spec!r}")


def _peak() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", required=True, help="DuoAttention pattern of the model")
    parser.add_argument("--out", default=None,
                        help="results folder (default: experiments/results/<device>)")
    parser.add_argument("--name", default="e2e", help="the results file: NAME.json")
    parser.add_argument("--model", default="llama3-8b", help="a preset; 'tiny' for a CPU smoke run")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=0,
                        help="prefill chunk for TTFT (0: one prefill; 128K fits unchunked)")
    parser.add_argument("--profile", type=int, nargs="?", const=20, default=0, metavar="TOP",
                        help="kernel summary of every row: its TOP (default 20) kernels")
    parser.add_argument("--policies", nargs="+", default=["dense", "lserve", "duo", "quest"])
    parser.add_argument("--backend", default=Backend.pallas, type=Backend,
                        choices=list(Backend))
    parser.add_argument("--decode", nargs="*", default=None, help="BATCHxCONTEXT ...")
    parser.add_argument("--ttft", type=int, nargs="*", default=list(TTFT))
    parser.add_argument("--capacity", type=int, nargs="*", default=[131072, 262144],
                        help="contexts of the computed largest-batch rows")
    parser.add_argument("--allocate", action="store_true",
                        help="capacity rows also allocate the pool of the batch they compute")
    parser.add_argument("--prefill-kernel", nargs="+", type=PrefillPath,
                        default=[RunConfig.prefill_kernel], choices=list(PrefillPath),
                        help="TTFT rows of the sparse policies once per prefill path")
    parser.add_argument("--vary", default=None, metavar="GROUP.KNOB=V1,V2",
                        help="decode rows once per value of a kernel tuning knob: "
                             + ", ".join(benchlib.KNOBS))
    parser.add_argument("--precision", nargs="+", default=["auto/auto"], metavar="WEIGHTS/KV",
                        help="rows per precision: weights auto|fp8, KV cache auto|"
                             + "|".join(kv_quant.KV_FORMATS[1:]) + ", e.g. fp8/int8")
    parser.add_argument("--rows", nargs="+", default=None, metavar="POLICY:BxT[:KNOB=V ...]",
                        help="these decode rows in this order instead of the --decode x "
                             "--policies (x --vary) grid, e.g. lserve:1x262144:select.topk_warps=8")
    args = parser.parse_args(argv)
    listed = [parse_row(spec) for spec in args.rows or []]
    settings = benchlib.parse_sweep(args.vary, "--vary") if args.vary else [Setting()]
    precisions = [parse_precision(p) for p in args.precision]
    facts = benchlib.measure_device()  # before the weights: the probe needs free memory
    model = load_model(args.model)
    cfg, params = model.config, model.params
    gates = load_gates(args.pattern)[: cfg.n_layers, : cfg.n_kv_heads]
    shapes = DECODE if args.decode is None else [tuple(map(int, s.split("x"))) for s in args.decode]
    configs = policies(dict.fromkeys(args.policies + [r[0] for r in listed]), args.chunk)
    if not listed:  # shape by shape, every policy next to each other (partial runs compare)
        listed = [(name, b, t, s) for s in settings for b, t in shapes for name in args.policies]
    rows: list[dict] = []
    label = f"{args.model}, random {cfg.dtype} weights"
    del model  # its bf16 parameters are `params` until the FP8 rows replace them
    # bf16 weights first: the FP8 rows quantize them and drop the bf16 copy
    for weights in sorted(dict.fromkeys(w for w, _ in precisions), key=lambda w: w != "auto"):
        if weights == "fp8":
            cfg, params = quantize_params(cfg, params)
        for kv in [kv for w, kv in precisions if w == weights]:
            bench = Bench(cfg, params, sum(x.nbytes for x in jax.tree.leaves(params))
                          - params["embed"].nbytes, gates, facts, args.backend, args.steps,
                          args.profile, kv, args.allocate)
            run_jobs(bench, args, configs, listed, rows, label)
            del bench  # nothing else may hold the parameters when FP8 replaces them
    print("wrote", benchlib.results_dir(args.out) / f"{args.name}.json")


def run_jobs(bench: Bench, args, configs: dict, listed: list, rows: list[dict],
             label: str) -> None:
    """Every row of one precision, in order (decode, TTFT, capacity), each appended to `rows`
    and written at once; a row that raises is a row with its error."""
    jobs = [(name, decode_row, (bench, name, configs[name], b, t, s))
            for name, b, t, s in listed]
    jobs += [(name, ttft_row, (bench, name, configs[name], t, kernel))
             for t in args.ttft for name in args.policies
             for kernel in (args.prefill_kernel[:1] if name == "dense" else args.prefill_kernel)]
    jobs += [(name, capacity_row, (bench, name, configs[name], t))
             for t in args.capacity for name in args.policies]
    precision = f"{bench.cfg.weight_dtype}/{bench.kv_dtype}"
    for name, fn, job in jobs:
        print(f"{time.strftime('%H:%M:%S')} {fn.__name__} {name} {precision} ...", flush=True)
        try:
            row = fn(*job)
        except Exception as err:  # noqa: BLE001 - a row of its own; measure the rest
            row = {"name": f"{fn.__name__}_{name}", "policy": name, **bench.precision,
                   "error": repr(err)[:300]}
        rows.append(row)
        print(row, flush=True)
        benchlib.write_results(args.name, _with_baselines(rows), args.out, bench.facts,
                               model=label,
                               cache="random K/V + exact page statistics (decode rows)",
                               ttft_chunk=args.chunk)


def parse_precision(text: str) -> tuple[str, str]:
    weights, _, kv = text.partition("/")
    if weights not in WEIGHT_DTYPES or kv not in kv_quant.KV_FORMATS:
        raise SystemExit(f"--precision {text!r}: write WEIGHTS/KV, WEIGHTS one of "
                         f"{WEIGHT_DTYPES}, KV one of {kv_quant.KV_FORMATS}, e.g. fp8/int8")
    return weights, kv


def _with_baselines(rows: list[dict]) -> list[dict]:
    """speedup against the dense row of the same kind, shape, tuning and precision, where both
    exist."""
    def key(r):
        return (r["name"].split("_")[0], r.get("batch"), r.get("context"), r.get("tuning"),
                r.get("weights"), r.get("kv_dtype"))

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
