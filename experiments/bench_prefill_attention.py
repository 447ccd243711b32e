"""One layer of Llama-3-8B prefill attention (32 query / 8 KV heads, d 128, bf16, B=1) on the
GPU: cuDNN dense causal vs our fused sparse kernel and the composite path of lserve_jax.attention
(cuDNN for the retrieval heads, our kernel for the streaming heads; `windowed`: cuDNN's sliding
window plus a sink call for the streaming heads too), with 50% streaming heads.

The ideal time of a sparse prefill is the dense heads' causal FLOPs plus the streaming heads'
visited tiles, at cuDNN's own measured rate in this run; the JSON also records the device's
bandwidth and bf16 matmul rate measured at the start (benchlib.measure_device). GPU only.

    python experiments/bench_prefill_attention.py [--out DIR] [--contexts 16384 65536 ...]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments import benchlib
from lserve_jax.attention.backends import composite_prefill, cudnn_causal
from lserve_jax.config import SparsityConfig
from pallas_kernels.sparse_prefill.api import sparse_prefill
from pallas_kernels.sparse_prefill.windowed import windowed_prefill

N_HEADS, KV_HEADS, HEAD_DIM, SINK = 32, 8, 128, 128
G = N_HEADS // KV_HEADS
ON_GPU = jax.default_backend() == "gpu"


def causal_flops(t: int, heads: int) -> float:
    return 2.0 * t * t * HEAD_DIM * heads  # QK^T and PV over the lower triangle


def window_flops(t: int, heads: int, local: int, sink: int = 0) -> float:
    visited = sum(min(i + 1, sink + local + 1) for i in range(0, t, 128)) * 128
    return 4.0 * visited * HEAD_DIM * heads


def cudnn_window(q, k, v, window):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                        local_window_size=window)


def rows_for(t: int, iters: int) -> list[dict]:
    keys = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(keys[0], (1, t, N_HEADS, HEAD_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(x, (1, t, KV_HEADS, HEAD_DIM), jnp.bfloat16) for x in keys[1:])
    lens = jnp.full((1,), t, jnp.int32)
    half = jnp.asarray([True] * 4 + [False] * 4)
    stream_kv = (0, 1, 2, 3)

    def timed(fn, *args):
        return benchlib.time_calls(jax.jit(fn), *args, warmup=1, iters=iters)

    base = timed(lambda q, k, v: cudnn_causal(q, k, v, lens), q, k, v)
    rate = causal_flops(t, N_HEADS) / (base / 1e3)  # cuDNN's FLOP/s on this shape
    rows = [{"name": "cudnn_dense", "policy": "dense", "ms": base, "tflops": rate / 1e12}]
    variants = {
        "fused_dense": (lambda q, k, v: sparse_prefill(
            q, k, v, lens, lens, jnp.zeros((KV_HEADS,), bool), sink=0, local=0), "dense",
            causal_flops(t, N_HEADS)),
    }
    for local in (8192, 4096):
        ideal = causal_flops(t, N_HEADS // 2) + window_flops(t, N_HEADS // 2, local, SINK)
        variants[f"fused_half_stream_local{local}"] = (
            lambda q, k, v, local=local: sparse_prefill(q, k, v, lens, lens, half, sink=SINK,
                                                        local=local), "lserve", ideal)
        for windowed in (False, True):
            path = "windowed" if windowed else "composite"
            variants[f"{path}_half_stream_local{local}"] = (
                lambda q, k, v, local=local, windowed=windowed: composite_prefill(
                    q, k, v, lens, stream_kv,
                    SparsityConfig(prefill_sink=SINK, prefill_local=local), windowed),
                "lserve", ideal)
    for name, (fn, policy, flops) in variants.items():
        ms = timed(fn, q, k, v)
        rows.append({"name": name, "policy": policy, "ms": ms, "ideal_ms": 1e3 * flops / rate,
                     "tflops": flops / (ms / 1e3) / 1e12})
    window = timed(lambda q, k, v: cudnn_window(q, k, v, (8192, 0)), q, k, v)
    ours = timed(lambda q, k, v: sparse_prefill(q, k, v, lens, lens,
                                                jnp.ones((KV_HEADS,), bool), sink=SINK,
                                                local=8192), q, k, v)
    rows.append({"name": "cudnn_sliding_window8192", "policy": "streaming", "ms": window})
    merged = timed(lambda q, k, v: windowed_prefill(q, k, v, lens, sink=SINK, local=8192),
                   q, k, v)
    rows.append({"name": "fused_streaming_only_local8192", "policy": "streaming", "ms": ours,
                 "vs_cudnn_sliding_window": round(window / ours, 3)})
    rows.append({"name": "windowed_streaming_only_local8192", "policy": "streaming",
                 "ms": merged, "vs_cudnn_sliding_window": round(window / merged, 3)})
    for row in rows:
        row.update(batch=1, context=t, baseline_ms=round(base, 3),
                   speedup=round(base / row["ms"], 3), ms=round(row["ms"], 3))
        for key in ("ideal_ms", "tflops"):
            if key in row:
                row[key] = round(row[key], 3)
        if "ideal_ms" in row:
            row["ratio_to_ideal"] = round(row["ms"] / row["ideal_ms"], 3)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="results folder (default: experiments/results/<device>)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--contexts", type=int, nargs="+",
                        default=[16384, 65536, 131072, 262144])
    args = parser.parse_args()
    if not ON_GPU:
        raise SystemExit("this benchmark needs a GPU (cuDNN); the kernel's CPU path is tested "
                         "in tests/kernels")
    facts = benchlib.measure_device()
    rows = []
    for t in args.contexts:
        try:
            new = rows_for(t, args.iters)
        except Exception as err:  # report and keep going (e.g. out of memory)
            new = [{"name": "error", "context": t, "error": repr(err)[:300]}]
        for row in new:
            print(row, flush=True)
        rows += new
        benchlib.write_results("prefill_attention", rows, args.out, facts,
                               shape="32 q heads, 8 KV heads, d 128, bf16, one layer, B=1",
                               streaming="50% of KV heads, sink 128 + local 8192 (or 4096)")


if __name__ == "__main__":
    main()
