"""Quantized KV and FP8 weights, measured in one process on the GPU.

1. One layer of Llama-3-8B decode attention (32 query / 8 KV heads, d 128) per KV format: cuDNN
   dense on a contiguous bf16 cache; our dense kernel and LServe's page lists (half the heads
   streaming, the others 4096 selected tokens; selection excluded: it reads the bf16 page
   statistics whatever the format) over bf16, int8, fp8, int8_token and int4 pages. Timed as
   bench_decode_attention.py times (`--reps` calls in a straight line inside one jit); floors
   are the bytes each must read over the bandwidth measured at the start.
2. The decode GEMMs of the 8B shape at M = 1 and 4 tokens: bf16; FP8 weights with the input
   quantized per token (`lserve_jax.model.quant.fp8_dot`, what the model runs); and FP8 weights
   converted to bf16 inside the jit (weight-only dequantization). Each call's output, resized,
   is the next one's input (so XLA cannot merge the calls into one GEMM). Each row lists the
   compiled HLO's GEMM calls and its temporary bytes: a bf16 copy of the weight made per call
   would show there (`bench_e2e.gemm_report`).

    python experiments/bench_quantized.py [--out DIR] [--shapes 1x65536 ...]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from experiments.bench_decode_attention import (G, HEAD_DIM, KV_HEADS, N_HEADS, ON_GPU,
                                                contiguous, paged_layer, time_per_call)
from experiments.bench_e2e import gemm_report
from lserve_jax.config import SparsityConfig
from lserve_jax.model.quant import fp8_dot, quantize_weight
from lserve_jax.sparsity.policy import DENSE, SELECT, STREAM
from pallas_kernels import kv_quant
from pallas_kernels.sparse_decode.api import sparse_decode

SHAPES = [(1, 65536), (1, 131072), (4, 65536)]
FORMATS = ("auto", "int8", "fp8", "int8_token", "int4")
LSERVE = SparsityConfig()  # N_P 64, N_L 16, budget 4096 tokens, decode sink 128 + local 256
# (K in, N out) of each decode GEMM of Llama-3-8B
GEMMS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
         "down": (14336, 4096), "lm_head": (4096, 128256)}


def quantized(pool, kind: str, b: int):
    """The bf16 pool in format `kind` (a static format: one scale for every row and head, the
    pool's absmax over qmax)."""
    if kind == "auto":
        return pool
    if kind in kv_quant.STATIC:
        levels = 127.0 if kind == "int8" else kv_quant.FP8_MAX
        scale = jnp.max(jnp.abs(pool.astype(jnp.float32))) / levels
        return kv_quant.QuantizedPool(kv_quant.quantize_static(pool, scale, kind),
                                      jnp.full((1, b, KV_HEADS), scale), kind)
    codes, scale, zero = kv_quant.quantize_token(pool, kind)
    return kv_quant.QuantizedPool(codes, jnp.stack([scale, zero], axis=1), kind)


def layer_rows(b: int, t: int, reps: int, iters: int, facts) -> list[dict]:
    n_p = LSERVE.page_size
    k_pool, v_pool, table, _, _ = paged_layer(b, t, n_p, LSERVE.logical_page_size,
                                              jax.random.key(t + b))
    q = jax.random.normal(jax.random.key(1), (b, KV_HEADS, G, HEAD_DIM), jnp.bfloat16)
    lengths = jnp.full((b,), t, jnp.int32)
    m = t // n_p
    rows = []

    def cudnn(q, keys, values):
        out = jax.nn.dot_product_attention(q.reshape(b, 1, N_HEADS, HEAD_DIM), keys, values,
                                           implementation="cudnn" if ON_GPU else None)
        return out.reshape(q.shape)

    keys, values = contiguous(k_pool, table), contiguous(v_pool, table)
    dense_bytes = 2 * b * t * KV_HEADS * HEAD_DIM * 2
    base = time_per_call(cudnn, reps, iters, q, keys, values)
    rows.append({"name": "cudnn_dense", "kv_dtype": "auto", "batch": b, "context": t,
                 "ms": round(base, 4), "floor_ms": round(facts.floor_ms(dense_bytes), 4)})
    del keys, values
    # LServe's lists: heads alternate streaming / selecting; 63 random earlier pages + current
    lserve_modes = jnp.asarray([[STREAM, SELECT] * (KV_HEADS // 2)], jnp.int8)
    rng = np.random.default_rng(b * t)
    chosen = np.full((b * KV_HEADS * G, LSERVE.selection_width), -1, np.int32)
    for row in chosen:
        row[: LSERVE.budget_pages - 1] = rng.permutation(m - 1)[: LSERVE.budget_pages - 1]
    selected = jnp.asarray(chosen.reshape(1, b, KV_HEADS, G, -1))
    dense_modes = jnp.full((1, KV_HEADS), DENSE, jnp.int8)
    per_head_stream = -(-LSERVE.decode_sink // n_p) + -(-LSERVE.decode_local // n_p) + 1
    for kind in FORMATS:
        kq, vq = quantized(k_pool, kind, b), quantized(v_pool, kind, b)
        token = kv_quant.token_bytes(kind, HEAD_DIM, 2)
        for policy, modes, pages in (
                ("dense", dense_modes, KV_HEADS * m),
                ("lserve", lserve_modes, KV_HEADS // 2 * (per_head_stream + (
                    G * LSERVE.budget_pages if m > LSERVE.budget_pages else m)))):
            def attend(q, kq, vq, table, selected, lengths, modes=modes):
                return sparse_decode(q, kq, vq, table, selected, lengths, modes, layer=0,
                                     sink=LSERVE.decode_sink, local=LSERVE.decode_local,
                                     budget_pages=LSERVE.budget_pages,
                                     max_listed=LSERVE.budget_pages if policy == "lserve"
                                     else None, interpret=not ON_GPU)

            ms = time_per_call(attend, reps, iters, q, kq, vq, table[:, None], selected,
                               lengths, modes)
            read = 2 * b * pages * n_p * token  # K and V of every page listed
            rows.append({"name": f"{policy}_kernel", "kv_dtype": kind, "batch": b,
                         "context": t, "ms": round(ms, 4), "cudnn_bf16_ms": round(base, 4),
                         "speedup_vs_cudnn_bf16": round(base / ms, 2),
                         "floor_ms": round(facts.floor_ms(read), 4)})
            print(rows[-1], flush=True)
    for row in rows[1:]:  # against our kernel of the same policy over bf16 pages
        same = next(r for r in rows if r["name"] == row["name"] and r["kv_dtype"] == "auto")
        row["speedup_vs_bf16_pages"] = round(same["ms"] / row["ms"], 2)
    return rows


def gemm_rows(tokens: int, names, reps: int, iters: int, facts) -> list[dict]:
    rows = []
    for name in names:
        k_in, n_out = GEMMS[name]
        w = (0.02 * jax.random.normal(jax.random.key(k_in + n_out), (k_in, n_out))
             ).astype(jnp.bfloat16)
        codes, scale = jax.jit(quantize_weight, static_argnums=1)(w, 1)
        upcast_w = jnp.swapaxes(codes, 0, 1)  # [K, N] fp8, converted inside the jit
        x = jax.random.normal(jax.random.key(3), (tokens, k_in), jnp.bfloat16)
        variants = {
            "bf16": (lambda x, w: x @ w, (x, w), 2),
            "fp8_w8a8": (lambda x, c, s: fp8_dot(x, c, s, 1, jnp.bfloat16), (x, codes, scale), 1),
            "fp8_weight_only": (lambda x, c, s: (x @ c.astype(jnp.bfloat16)) * s.astype(
                jnp.bfloat16), (x, upcast_w, scale), 1),
        }
        for variant, (fn, args, width) in variants.items():
            def chained(x, *weights, fn=fn):  # the output, resized, is the next call's input:
                return jnp.resize(fn(x, *weights), x.shape)  # no two GEMMs can merge
            ms = time_per_call(chained, reps, iters, *args)
            compiled = jax.jit(fn).lower(*args).compile()
            rows.append({"name": f"gemm_{name}", "variant": variant, "tokens": tokens,
                         "k": k_in, "n": n_out, "ms": round(ms, 4),
                         "floor_ms": round(facts.floor_ms(k_in * n_out * width), 4),
                         **gemm_report(compiled)})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="results folder (default: experiments/results/<device>)")
    parser.add_argument("--shapes", nargs="+", default=None, help="BATCHxCONTEXT, e.g. 1x65536")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4],
                        help="GEMM rows (decode batch)")
    parser.add_argument("--gemms", nargs="*", default=list(GEMMS), choices=list(GEMMS))
    parser.add_argument("--reps", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split("x")))
                                                 for s in args.shapes]
    facts = benchlib.measure_device()
    rows = []

    def write():  # after every part: a run cut short keeps what it measured
        return benchlib.write_results("quantized_layer", rows, args.out, facts,
                                      kernel="one layer, Llama-3-8B heads, LServe pages 64/16")

    for tokens in args.tokens:
        rows += gemm_rows(tokens, args.gemms, args.reps, args.iters, facts)
        write()
    for b, t in shapes:
        print(f"{time.strftime('%H:%M:%S')} layer {b}x{t}", flush=True)
        rows += layer_rows(b, t, args.reps, args.iters, facts)
        write()
    print("wrote", write())


if __name__ == "__main__":
    main()
