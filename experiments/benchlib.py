"""Shared benchmark plumbing: device facts, timing, result files. Benchmarks are scripts run on
the H200 (see README, GPU path); nothing here is a test."""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax

from lserve_jax.experiment import provenance

HBM_BYTES_PER_S = 4.3e12  # measured device-to-device copy on our H200 (DESIGN section 3)
BF16_FLOPS_PER_S = 750e12  # measured bf16 matmul rate on our H200
RESULTS = pathlib.Path(__file__).parent / "results"


def floor_ms(bytes_moved: float = 0.0, flops: float = 0.0) -> float:
    """The physical floor: the larger of bytes / bandwidth and FLOPs / matmul rate."""
    return 1e3 * max(bytes_moved / HBM_BYTES_PER_S, flops / BF16_FLOPS_PER_S)


def time_calls(fn, *args, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time (ms) of `fn(*args)` with its outputs ready; fn must not donate."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


header = provenance  # device, platform, jax version and date: the head of every result file


def write_results(name: str, rows: list[dict], out_dir: pathlib.Path | None = None,
                  **extra) -> pathlib.Path:
    out_dir = pathlib.Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({**header(), **extra, "rows": rows}, indent=1) + "\n")
    return path


def kernel_summary(fn, *args, steps: int = 4, top: int = 12) -> tuple[dict, tuple]:
    """Runs `args = fn(*args)` `steps` times under the JAX profiler and sums device-kernel
    time from its Perfetto trace: kernels per call, busy ms per call and the `top` kernels by
    time. Returns (summary, the last args): `fn` may donate what it is called with."""
    import gzip
    import tempfile
    from collections import Counter, defaultdict

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                args = fn(*args)
            jax.block_until_ready(args)
        trace = next(pathlib.Path(tmp).rglob("perfetto_trace.json.gz"))
        events = json.loads(gzip.decompress(trace.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "/device:" in name}
    time_by, count = defaultdict(float), Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            time_by[e["name"]] += e.get("dur", 0) / 1e3
            count[e["name"]] += 1
    ranked = sorted(time_by, key=time_by.get, reverse=True)[:top]
    return {"kernels_per_call": sum(count.values()) / steps,
            "busy_ms_per_call": round(sum(time_by.values()) / steps, 4),
            "processes": sorted(names.values()),
            "top": [{"name": n[:120], "ms_per_call": round(time_by[n] / steps, 4),
                     "per_call": count[n] / steps} for n in ranked]}, args
