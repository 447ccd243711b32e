"""Device time (XProf kernel totals, not wall time) of the decode kernels per layer call, over
their tuning settings, at one-layer shapes of the Llama-3-8B serving loop: the sparse decode
kernel over DecodeBlocks (pages per split, pipeline stages, warps, pages per step) for dense
1x4K and LServe 1x256K, and selection over SelectTuning(topk_chunk, topk_warps) at LServe
1x256K (rows say `"tuning": "select.topk_chunk=C,select.topk_warps=W"`). Each setting runs 32
calls in one jit (bench_decode_attention.repeated); the JSON lists the microseconds per call
of every kernel that ran once per call (the decode kernel, the merge and pad fusions around
it, or page_scores + top_pages). GPU only (the profiler's device kernels).

    python experiments/probe_decode_kernels.py [--out DIR]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from experiments import bench_decode_attention as bench
from experiments import benchlib
from lserve_jax.sparsity.policy import SELECT, STREAM
from pallas_kernels.sparse_decode.api import sparse_decode
from pallas_kernels.sparse_decode.kernel import DecodeBlocks as D

REPS = 32
BLOCKS = [None] + [D(1, pps, 4, st) for pps in (1, 2, 4, 8, 16) for st in (1, 2, 3, 4)] + [
    D(1, pps, w, 3) for pps in (2, 8) for w in (1, 2, 8)] + [D(2, 8, 4, 3), D(2, 4, 4, 3),
                                                             D(4, 8, 4, 3)]
TOPK = [benchlib.setting({"select.topk_chunk": chunk, "select.topk_warps": warps},
                         "probe_decode_kernels.TOPK")
        for chunk, warps in ((4096, 4), (2048, 4), (1024, 4), (4096, 8), (8192, 8), (2048, 2))]


def device_us(fn, *args, chain=True) -> dict[str, float]:
    run = bench.repeated(fn, REPS, chain)
    jax.block_until_ready(run(*args))

    def once(*a):
        jax.block_until_ready(run(*a))
        return a

    summary, _ = benchlib.kernel_summary(once, *args, steps=3, top=40)
    return {k["name"]: round(k["ms_per_call"] / REPS * 1e3, 2) for k in summary["top"]
            if k["per_call"] >= REPS}


def layer(b, t, policy):
    """One layer's (operands, blocks -> attention fn, selection operands): every head DENSE
    (`bench.dense_paged`), or half the KV heads SELECT (pages chosen by the selector) and half
    STREAM."""
    sp = bench.LSERVE
    k_pool, v_pool, table, kmin, kmax = bench.paged_layer(b, t, 64, 16, jax.random.key(t + b))
    q = jax.random.normal(jax.random.key(9), (b, 8, 4, 128), jnp.bfloat16)
    if policy == "dense":
        return (q, k_pool, v_pool, table), (
            lambda blocks: functools.partial(bench.dense_paged, blocks=blocks)), None
    lengths = jnp.full((b,), t, jnp.int32)
    modes = jnp.asarray([[SELECT, STREAM] * 4], jnp.int32)
    table = table[:, None]
    selected = jax.jit(bench.selector(sp))(q, kmin, kmax, table, lengths, modes)[None]
    kw = dict(layer=0, sink=sp.decode_sink, local=sp.decode_local, budget_pages=sp.budget_pages,
              max_listed=max(sp.budget_pages, sp.stream_pages), interpret=not bench.ON_GPU)
    return (q, k_pool, v_pool, table, selected, lengths, modes), (
        lambda blocks: functools.partial(sparse_decode, blocks=blocks, **kw)), (
        q, kmin, kmax, table, lengths, modes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="results folder (default: experiments/results/<device>)")
    args = parser.parse_args()
    if not bench.ON_GPU:
        raise SystemExit("this probe reads GPU kernels from the profiler: run it on a GPU")
    facts = benchlib.measure_device()
    rows = []
    for b, t, policy in ((1, 4096, "dense"), (1, 262144, "lserve")):
        operands, attend, selection = layer(b, t, policy)
        for blocks in BLOCKS:
            rows.append({"shape": f"{policy} {b}x{t}", "blocks": str(blocks),
                         "us_per_call": device_us(attend(blocks), *operands)})
            print(rows[-1], flush=True)
            benchlib.write_results("decode_kernel_probe", rows, args.out, facts)
    for setting in TOPK:
        rows.append({"shape": "lserve selection 1x262144", "tuning": setting.label,
                     "us_per_call": device_us(bench.selector(bench.LSERVE,
                                                             tuning=setting.tuning.select),
                                              *selection, chain=False)})
        print(rows[-1], flush=True)
        benchlib.write_results("decode_kernel_probe", rows, args.out, facts)


if __name__ == "__main__":
    main()
