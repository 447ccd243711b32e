"""Page selection of one Llama-3-8B decode layer (32 query / 8 KV heads, d 128, bf16) on the
GPU: the fixed top-k against the anchored list (LServe's default) and the adaptive budget
(top-p over pages) at several p, on the same random page statistics; LServe's pages and budget
(64/16, 4096 tokens), half the KV heads selecting, one list per query head.

Each variant runs `--reps` times in a straight line inside one jit (as the unrolled layers of a
model run) and the median of `--iters` such calls / reps is reported (bench_decode_attention's
timing). The pages each adaptive list keeps are reported too, but random keys spread the
estimated mass evenly, so those counts say nothing about a trained model's: the accuracy grids
and the recall task measure them (experiments/README.md). On the CPU the kernels are
interpreted: a smoke run only (e.g. --shapes 1x4096 --reps 1 --iters 1).

    python experiments/bench_select.py [--out DIR] [--shapes 1x131072 ...] [--p 0.5 0.9 0.99]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from experiments.bench_decode_attention import (G, HEAD_DIM, KV_HEADS, LSERVE, paged_layer,
                                                selector, time_per_call)
from lserve_jax.sparsity.policy import SELECT, STREAM

SHAPES = [(1, 32768), (1, 131072), (1, 262144), (8, 131072)]


def variants(ps: list[float]) -> list[tuple[str, object]]:
    """(name, SparsityConfig): the fixed top-k without and with the anchor, then adaptive p."""
    fixed = dataclasses.replace(LSERVE, reuse_anchor=False)
    return ([("top_k", fixed), ("top_k_anchored", LSERVE)]
            + [(f"top_p_{p}", dataclasses.replace(LSERVE, adaptive_p=p)) for p in ps])


def rows_for(b: int, t: int, ps: list[float], reps: int, iters: int) -> list[dict]:
    sparsity = LSERVE
    _, _, table, kmin, kmax = paged_layer(b, t, sparsity.page_size, sparsity.logical_page_size,
                                          jax.random.key(b * 7 + t))
    q = jax.random.normal(jax.random.key(9), (b, KV_HEADS, G, HEAD_DIM), jnp.bfloat16)
    lengths = jnp.full((b,), t, jnp.int32)
    modes = jnp.asarray([STREAM] * 4 + [SELECT] * 4, jnp.int8)[None]
    table = table[:, None]
    rows = []
    for name, variant in variants(ps):
        select = selector(variant)
        ms = time_per_call(select, reps, iters, q, kmin, kmax, table, lengths, modes,
                           chain=False)
        chosen = np.asarray(jax.jit(select)(q, kmin, kmax, table, lengths, modes))
        listed = (chosen >= 0).sum(-1)[:, 4:]  # the SELECT heads
        rows.append({"name": name, "batch": b, "context": t, "adaptive_p": variant.adaptive_p,
                     "anchor": variant.reuse_anchor, "ms": round(ms, 4),
                     "mean_listed_pages": round(float(listed.mean()), 2)})
        print(rows[-1], flush=True)
    base = rows[0]["ms"]
    for row in rows:
        row["vs_top_k"] = round(row["ms"] / base, 3)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="results folder (default: experiments/results/<device>)")
    parser.add_argument("--shapes", nargs="+", default=None, help="BATCHxCONTEXT, e.g. 8x131072")
    parser.add_argument("--p", nargs="+", type=float, default=[0.5, 0.9, 0.99])
    parser.add_argument("--reps", type=int, default=32, help="calls per timed jit (layers)")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    facts = benchlib.measure_device()
    rows = []
    for b, t in shapes:
        rows += rows_for(b, t, args.p, args.reps, args.iters)
    path = benchlib.write_results("select_adaptive", rows, args.out, facts,
                                  sparsity=dataclasses.asdict(LSERVE))
    print("wrote", path)


if __name__ == "__main__":
    main()
