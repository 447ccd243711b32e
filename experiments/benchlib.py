"""Shared benchmark plumbing: the device's measured bandwidth, matmul rate and memory (floors and
out-of-memory decisions use them), kernel tuning from the command line, timing, and result
files under experiments/results/<device>/. Benchmarks are scripts run on a GPU (README, GPU
path); nothing here is a test."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import statistics
import time

import jax
import jax.numpy as jnp

from lserve_jax.attention import KernelTuning
from lserve_jax.lab.report import provenance

RESULTS = pathlib.Path(__file__).parent / "results"
# probe sizes: (copied array bytes, matmul side); on the CPU small, so that tests stay quick
PROBE = {"accelerator": (2 * 2**30, 8192), "cpu": (4 * 2**20, 256)}


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the first device sustains, measured in this process (`measure_device`)."""

    bandwidth_bytes_per_s: float  # the faster of a large copy (read + write) and a large read
    matmul_flops_per_s: float  # 2 n^3 / median time of an n x n x n bf16 matmul
    memory_bytes: int  # what the device may allocate (bytes_limit), or host RAM on the CPU
    method: str  # how the three were obtained

    def floor_ms(self, bytes_moved: float = 0.0, flops: float = 0.0) -> float:
        """The physical floor: the larger of bytes / bandwidth and FLOPs / matmul rate."""
        return 1e3 * max(bytes_moved / self.bandwidth_bytes_per_s,
                         flops / self.matmul_flops_per_s)

    def record(self) -> dict:
        """The fields every result file carries."""
        return {"measured_bandwidth_gbps": round(self.bandwidth_bytes_per_s / 1e9, 1),
                "measured_matmul_tflops": round(self.matmul_flops_per_s / 1e12, 2),
                "device_memory_gib": round(self.memory_bytes / 2**30, 1),
                "device_facts_method": self.method}


@functools.cache
def measure_device() -> DeviceFacts:
    """Bandwidth: the faster of a jitted `x + 1` over a bf16 array (2 GiB on an accelerator;
    bytes read + written) and a max-reduction over it (bytes read): decode steps mostly read,
    and HBM reads alone run faster than a copy (on an H100, cuDNN's decode read 3.05 TB/s where
    the copy gave 2.85), so a floor from the copy alone could exceed a measured time. Matmul
    rate from a bf16 matmul (8192^3). Each the median of 10 batches of 5 back-to-back calls;
    memory from the device's `bytes_limit`. On the CPU the probes are tiny (4 MiB, 256^3) and
    memory is host RAM: indicative numbers for smoke runs only. Measured once per process."""
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    nbytes, n = PROBE["cpu" if on_cpu else "accelerator"]
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    copy_s = _seconds_per_call(jax.jit(lambda x: x + jnp.bfloat16(1)), x)
    read_s = _seconds_per_call(jax.jit(jnp.max), x)
    del x
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul_s = _seconds_per_call(jax.jit(jnp.matmul), a, a)
    limit = (dev.memory_stats() or {}).get("bytes_limit")
    memory = limit or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    copy, read = 2 * nbytes / copy_s, nbytes / read_s
    method = (f"bandwidth: the faster of a copy (x + 1 over {nbytes / 2**20:.0f} MiB bf16, read "
              f"+ write: {copy / 1e9:.0f} GB/s) and a read (max over it: {read / 1e9:.0f} GB/s); "
              f"matmul: {n}^3 bf16; median of 10 batches of 5 calls; memory: "
              + ("bytes_limit of the device" if limit else "host RAM (no device bytes_limit)"))
    if on_cpu:
        method = "CPU smoke probe, indicative only: " + method
    return DeviceFacts(max(copy, read), 2 * n**3 / matmul_s, int(memory), method)


def _seconds_per_call(fn, *args, batches: int = 10, calls: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def device_slug(kind: str, platform: str) -> str:
    """A short folder name for a device: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" ->
    "h200", any CPU -> "cpu"; otherwise the kind's words joined by "-"."""
    if platform == "cpu":
        return "cpu"
    words = [w for w in re.split(r"[^a-z0-9]+", kind.lower()) if w and w not in ("nvidia", "amd")]
    model = next((w for w in words if re.fullmatch(r"[a-z]+\d+[a-z]*", w)), None)
    return model if model and platform == "gpu" else "-".join(words) or platform


def results_dir(out: str | pathlib.Path | None) -> pathlib.Path:
    """`out`, or experiments/results/<device slug>/ of the first device."""
    if out:
        return pathlib.Path(out)
    dev = jax.devices()[0]
    return RESULTS / device_slug(getattr(dev, "device_kind", str(dev)), dev.platform)


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


def write_results(name: str, rows: list[dict], out: str | pathlib.Path | None,
                  facts: DeviceFacts | None, **extra) -> pathlib.Path:
    """<out or the device folder>/<name>.json: provenance, the measured device facts (None:
    the rows are computed, not timed), `extra`, then the rows."""
    out_dir = results_dir(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    head = {**provenance(), **(facts.record() if facts else {})}
    path.write_text(json.dumps({**head, **extra, "rows": rows}, indent=1) + "\n")
    return path


# --- kernel tuning from the command line: "decode.min_pages_per_split=4" ------------------

KNOBS = tuple(f"{group.name}.{field.name}" for group in dataclasses.fields(KernelTuning)
              for field in dataclasses.fields(group.default))


@dataclasses.dataclass(frozen=True)
class Setting:
    """Kernel tuning with some knobs away from their defaults, and its label for result rows
    ("" when every knob keeps its default)."""

    label: str = ""
    tuning: KernelTuning = KernelTuning()


def setting(knobs: dict[str, int], flag: str) -> Setting:
    """The Setting of `knobs` ({"decode.num_stages": 2, ...}); errors name `flag`."""
    tuning = KernelTuning()
    try:
        for name, value in knobs.items():
            if name not in KNOBS:
                raise ValueError(f"unknown knob {name!r}: use one of {', '.join(KNOBS)}")
            group, field = name.split(".")
            tuning = dataclasses.replace(tuning, **{group: dataclasses.replace(
                getattr(tuning, group), **{field: value})})
    except ValueError as err:
        raise SystemExit(f"{flag}: {err}") from None
    return Setting(",".join(f"{n}={v}" for n, v in knobs.items()), tuning)


def parse_sweep(spec: str, flag: str) -> list[Setting]:
    """'decode.min_pages_per_split=2,4,8' -> one Setting per value."""
    name, _, values = spec.partition("=")
    try:
        numbers = [int(v) for v in values.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} {spec!r}: use GROUP.KNOB=V1,V2,... with integer values and "
                         f"GROUP.KNOB one of {', '.join(KNOBS)}") from None
    return [setting({name: v}, f"{flag} {spec!r}") for v in numbers]


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
