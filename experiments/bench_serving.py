r"""Serving throughput and latency (vLLM's `benchmark_serving` idea, in process): a seeded
request mix runs through the engine under each policy and schedule, all requests at t = 0
(offline) or arriving as a Poisson process at given rates (online).

Reports per (policy, schedule, rate): output tokens/s, requests/s, time to first token and time
per output token (p50 / p99), peak KV pages of the pool, the time split between prefill and
decode, the mean number of slots that decoded together, and the decode steps' speed against
the byte floor at the batch they ran (weights + the KV each decoding request's policy reads,
`attended_tokens`, over the bandwidth measured in this process). The `wave` schedule (static
batching) runs in the same process as the baseline. Random weights and prompts, no stop token
(every request generates exactly its output length).

Mixes: `A` long outputs (16 requests, prompts log-uniform 8K-64K, outputs uniform 1K-4K), `B`
long prompts (16 requests, prompts 16K-128K, outputs 128-512), `toy` (CPU smoke size). `--scale
S` multiplies every length (a quick check of a mix's shape).

    python experiments/bench_serving.py --mix A --pattern DIR --backend pallas
    python experiments/bench_serving.py --mix A --pattern DIR --rates 0.05 0.1 0.2 \
        --schedules continuous
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments import benchlib
from lserve_jax.cache.allocator import page_bytes
from lserve_jax.config import Backend, CacheConfig, ModelConfig, SchedulerConfig, SparsityConfig
from lserve_jax.engine import Engine
from lserve_jax.model import load_model
from lserve_jax.sampling import SamplingParams
from lserve_jax.sparsity.heads import load_gates
from lserve_jax.sparsity.policy import attended_tokens


@dataclasses.dataclass(frozen=True)
class Mix:
    requests: int
    prompt: tuple[int, int]  # log-uniform
    output: tuple[int, int]  # uniform


MIXES = {"A": Mix(16, (8192, 65536), (1024, 4096)), "B": Mix(16, (16384, 131072), (128, 512)),
         "toy": Mix(6, (16, 96), (4, 24))}


def requests(mix: Mix, vocab: int, seed: int, scale: float = 1.0) -> list[tuple[list[int], int]]:
    """(prompt, output length) per request, seeded."""
    rng = np.random.default_rng(seed)
    lo, hi = (max(1, int(x * scale)) for x in mix.prompt)
    lengths = np.exp(rng.uniform(math.log(lo), math.log(hi), mix.requests)).astype(int)
    outputs = rng.integers(max(1, int(mix.output[0] * scale)),
                           max(2, int(mix.output[1] * scale)) + 1, mix.requests)
    return [(rng.integers(0, vocab, n).tolist(), int(m)) for n, m in zip(lengths, outputs)]


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Seconds after the start at which each request arrives (rate inf: all at 0)."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / rate, n))


def run_mix(engine: Engine, mix: list[tuple[list[int], int]], at: np.ndarray) -> list:
    """Adds each request when its arrival time has come and steps the engine until all are
    done; returns the finished outputs in request order."""
    t0 = time.perf_counter()
    pending = list(range(len(mix)))
    done = {}
    ids = {}
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and at[pending[0]] <= now:
            i = pending.pop(0)
            prompt, n = mix[i]
            ids[engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True),
                                   arrival=t0 + at[i])] = i
        if not engine.has_unfinished():
            time.sleep(max(0.0, at[pending[0]] - now))
            continue
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
    return [done[i] for i in range(len(mix))]


def summarize(outs: list, engine: Engine, seconds: float, weights: int,
              facts: benchlib.DeviceFacts) -> dict:
    tokens = sum(len(o.token_ids) for o in outs)
    ttft = [o.metrics.time_to_first_token * 1e3 for o in outs]
    tpot = [o.metrics.time_per_output_token(len(o.token_ids)) * 1e3 for o in outs
            if len(o.token_ids) > 1]
    stats = engine.stats
    per_token = engine.model_cfg.kv_bytes_per_token
    floor_s = sum(steps * facts.floor_ms(weights + per_token * sum(
        attended_tokens(engine.modes, c, engine.sparsity) for c in contexts)) / 1e3
                  for contexts, steps, _ in stats.decode_trace)
    steps_run = sum(steps for _, steps, _ in stats.decode_trace)
    return {
        "requests": len(outs), "output_tokens": tokens, "seconds": round(seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 1),
        "requests_per_s": round(len(outs) / seconds, 4),
        "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 1),
        "ttft_ms_p99": round(float(np.percentile(ttft, 99)), 1),
        "tpot_ms_p50": round(float(np.percentile(tpot, 50)), 2),
        "tpot_ms_p99": round(float(np.percentile(tpot, 99)), 2),
        "decode_step_ms": round(1e3 * stats.decode_s / max(steps_run, 1), 2),
        "decode_step_floor_ms": round(1e3 * floor_s / max(steps_run, 1), 2),
        "prefill_s": round(stats.prefill_s, 2), "decode_s": round(stats.decode_s, 2),
        "mean_decoding_slots": round(stats.slot_steps / max(stats.decode_chunks, 1), 2),
        "peak_pages": stats.peak_pages, "pool_pages": engine.pages.allocator.capacity,
        "iterations": stats.iterations}


def pool_pages(cfg: ModelConfig, sparsity: SparsityConfig, weights: int,
               facts: benchlib.DeviceFacts, headroom: int) -> int:
    """Physical pages (one (layer, KV head) each) that fit beside the weights."""
    return int((facts.memory_bytes - weights - headroom) // page_bytes(cfg, sparsity))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mix", default="A", choices=sorted(MIXES))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=None, help="override the mix's count")
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--pattern", default=None, help="DuoAttention pattern (static policies)")
    parser.add_argument("--policies", nargs="+", default=["dense", "lserve"])
    parser.add_argument("--schedules", nargs="+", default=["continuous", "wave"])
    parser.add_argument("--rates", nargs="+", type=float, default=[math.inf],
                        help="requests per second (inf: offline, all at t = 0)")
    parser.add_argument("--backend", default=Backend.pallas, type=Backend, choices=list(Backend))
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=8192, help="prefill chunk (tokens)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--pool-pages", type=int, default=0,
                        help="pool size (0: what fits beside the weights)")
    parser.add_argument("--headroom-gib", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    model = load_model(args.model, args.seed)
    cfg = model.config
    mix = MIXES[args.mix]
    if args.requests:
        mix = dataclasses.replace(mix, requests=args.requests)
    reqs = requests(mix, cfg.vocab_size, args.seed, args.scale)
    gates = load_gates(args.pattern) if args.pattern else None
    facts = benchlib.measure_device()
    weights = sum(x.nbytes for x in jax.tree.leaves(model.params)) - (
        0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim * cfg.itemsize)
    longest = max(len(p) + n for p, n in reqs)
    setup = {**dataclasses.asdict(mix), "scale": args.scale, "seed": args.seed,
             "model": args.model, "slots": args.slots, "prefill_chunk": args.chunk,
             "decode_steps": args.decode_steps, "backend": str(args.backend)}

    def write(rows):
        return benchlib.write_results(f"serving_{args.mix}", rows, args.out, facts, mix=setup)

    rows = []
    bar = tqdm(total=len(args.policies) * len(args.schedules) * len(args.rates), unit="run")
    for policy in args.policies:
        sparsity = SparsityConfig(prefill_chunk=args.chunk).for_policy(policy)
        pages = args.pool_pages or pool_pages(cfg, sparsity, weights, facts,
                                              int(args.headroom_gib * 2**30))
        engine = Engine(cfg, model.params, sparsity,
                        CacheConfig(max_seq_len=longest, max_batch=args.slots, num_pages=pages),
                        gates if sparsity.static else None, backend=args.backend,
                        scheduler=SchedulerConfig(decode_steps=args.decode_steps), seed=args.seed)
        start = time.perf_counter()  # compile every step's shape on a short request pair
        warm = [([1] * min(args.chunk + 1, longest - 2), 2), ([1] * 5, 2)]  # both phases
        run_mix(engine, warm, np.zeros(2))
        compile_s = time.perf_counter() - start
        for schedule in args.schedules:
            for rate in args.rates:
                engine.reschedule(SchedulerConfig(schedule=schedule,
                                                  decode_steps=args.decode_steps))
                bar.set_postfix_str(f"{policy} {schedule} rate {rate}")
                start = time.perf_counter()
                outs = run_mix(engine, reqs, arrivals(len(reqs), rate, args.seed))
                row = {"policy": policy, "schedule": schedule,
                       "rate": "inf" if math.isinf(rate) else rate,
                       **summarize(outs, engine, time.perf_counter() - start, weights, facts),
                       "compile_s": round(compile_s, 1)}
                rows.append(row)
                path = write(rows)  # after every run: a timeout keeps what finished
                tqdm.write(str(row))
                bar.update()
        del engine  # its pool goes before the next policy's is allocated
        gc.collect()
    bar.close()
    print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
