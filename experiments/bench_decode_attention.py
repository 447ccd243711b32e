"""One layer of Llama-3-8B decode attention (32 query / 8 KV heads, d 128, bf16) on the GPU:
cuDNN dense and XLA dense on a contiguous cache vs our paged kernel under dense, Quest and
LServe page lists, on the same random data.

Every variant runs `--reps` (32) times in a straight line inside one jit, each call's output
the next one's query (as the unrolled layers of the model run: no while loop, whose
per-iteration device-to-host sync would be counted), and the median of `--iters` such calls /
reps is reported, so launch gaps are those of a real decode step, not of Python dispatch.
Selection (page scores + top-k) is timed separately and amortised over the reuse interval R
(Quest: R = 1, LServe: R = 4). Floors are the bytes each variant must read over the
bandwidth measured at the start of the run (benchlib.measure_device). `--sweep` also times the
dense and sparse kernel over DecodeBlocks at 8x131072 and 1x262144; `--sweep-select` times
selection alone (lserve_query_head) over score-kernel blocks and top-k radix widths
(`SelectTuning.radix_bits`) at SELECT_SHAPES (or --shapes), into the JSON's `select_sweep`.
On the CPU the kernels are interpreted: a smoke run only (e.g. --shapes 1x4096 --reps 1).

    python experiments/bench_decode_attention.py [--out DIR] [--shapes 1x4096 ...]
        [--sweep] [--sweep-select]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp

from experiments import benchlib
from experiments.benchlib import DeviceFacts
from lserve_jax.config import SparsityConfig
from lserve_jax.sparsity.pages import group_reduce, select_kwargs
from lserve_jax.sparsity.policy import DENSE, SELECT, STREAM, list_width
from pallas_kernels.page_select.api import select_pages
from pallas_kernels.page_select.kernel import ScoreBlocks, SelectTuning
from pallas_kernels.sparse_decode.api import sparse_decode
from pallas_kernels.sparse_decode.kernel import DecodeBlocks
from pallas_kernels.sparse_decode.reference import decode_page_lists

N_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
G = N_HEADS // KV_HEADS
SHAPES = [(b, t) for t in (32768, 131072, 262144) for b in (1, 8, 32)]
LSERVE = SparsityConfig()  # N_P 64, N_L 16, budget 4096, R 4, decode sink 128 + local 256
QUEST = dataclasses.replace(SparsityConfig(reuse_interval=1), policy="quest", page_size=16)
ON_GPU = jax.default_backend() == "gpu"  # elsewhere: interpret the kernels (a smoke run only)


def paged_layer(b, t, page_size, logical, key):
    """Random bf16 K/V of one layer in a shuffled page pool + exact page statistics."""
    m = t // page_size
    p = 1 + b * KV_HEADS * m
    k1, k2, k3 = jax.random.split(key, 3)

    @jax.jit
    def make():
        k_pool = jax.random.normal(k1, (p, page_size, HEAD_DIM), jnp.bfloat16)
        v_pool = jax.random.normal(k2, (p, page_size, HEAD_DIM), jnp.bfloat16)
        table = (1 + jax.random.permutation(k3, p - 1)).reshape(b, KV_HEADS, m).astype(jnp.int32)
        rows = k_pool.reshape(p, page_size // logical, logical, HEAD_DIM)
        return k_pool, v_pool, table, rows.min(axis=2), rows.max(axis=2)

    return make()


def contiguous(pool, table):
    b, kh, m = table.shape
    return pool[table].reshape(b, kh, m * pool.shape[1], HEAD_DIM).transpose(0, 2, 1, 3)


def repeated(fn, reps, chain=True):
    """jit(q, *args) running fn `reps` times in a straight line, as a model's unrolled layers
    run (an XLA while loop would add a device-to-host sync per iteration). chain: each call's
    output is the next call's query (attention: same shape); otherwise call i reads q * (1 + i)
    (no CSE) and every output is returned."""
    @jax.jit
    def run(q, *args):
        if chain:
            for _ in range(reps):
                q = fn(q, *args)
            return q
        return [fn(q * (1 + i), *args) for i in range(reps)]
    return run


def time_per_call(fn, reps, iters, *args, chain=True):
    return benchlib.time_calls(repeated(fn, reps, chain), *args, warmup=2, iters=iters) / reps


def sparse_rows(name, sparsity, modes, b, t, reps, iters, key, dense_ms, facts: DeviceFacts,
                sweep=()):
    k_pool, v_pool, table, kmin, kmax = paged_layer(b, t, sparsity.page_size,
                                                    sparsity.logical_page_size, key)
    q = jax.random.normal(jax.random.key(9), (b, KV_HEADS, G, HEAD_DIM), jnp.bfloat16)
    lengths = jnp.full((b,), t, jnp.int32)
    table, modes = table[:, None], modes[None]  # one layer
    interpret = not ON_GPU
    kw = dict(layer=0, sink=sparsity.decode_sink, local=sparsity.decode_local,
              budget_pages=sparsity.budget_pages, interpret=interpret,
              max_listed=max(list_width(sparsity, t // sparsity.page_size),
                             sparsity.stream_pages))
    select = selector(sparsity)

    def attend(q, k_pool, v_pool, table, selected, lengths, modes):
        return sparse_decode(q, k_pool, v_pool, table, selected, lengths, modes, **kw)

    selected = jax.jit(select)(q, kmin, kmax, table, lengths, modes)[None]
    swept = {}
    for blocks in sweep:
        def attend_with(q, k_pool, v_pool, table, selected, lengths, modes, blocks=blocks):
            return sparse_decode(q, k_pool, v_pool, table, selected, lengths, modes, **kw,
                                 blocks=blocks)
        swept[str(blocks)] = round(time_per_call(attend_with, reps, iters, q, k_pool, v_pool,
                                                 table, selected, lengths, modes), 4)
    attn_ms = time_per_call(attend, reps, iters, q, k_pool, v_pool, table, selected, lengths,
                            modes)
    sel_ms = time_per_call(select, reps, iters, q, kmin, kmax, table, lengths, modes,
                           chain=False)
    n_p = sparsity.page_size
    _, counts = decode_page_lists(selected[0], lengths, modes[0], width=t // n_p, page_size=n_p,
                                  local=sparsity.decode_local, sink_pages=sparsity.sink_pages,
                                  budget_pages=sparsity.budget_pages)
    gs = counts.shape[2]
    work = jnp.where((modes[0] != SELECT)[None, :, None] & (jnp.arange(gs) > 0), 0, counts)
    attn_bytes = int(jnp.sum(work)) * 2 * n_p * HEAD_DIM * 2
    score_bytes = stats_bytes(kmin, modes, b, t // n_p)
    total = attn_ms + sel_ms / sparsity.reuse_interval
    return [{"name": name, "policy": name.split("_")[0], "batch": b, "context": t,
             "ms": round(total, 4), "attention_ms": round(attn_ms, 4),
             "selection_ms_per_call": round(sel_ms, 4), "reuse_interval": sparsity.reuse_interval,
             "baseline_ms": dense_ms, "speedup": round(dense_ms / total, 2),
             "gbps": round(attn_bytes / attn_ms / 1e6, 1),
             "selection_gbps": round(score_bytes / sel_ms / 1e6, 1),
             "floor_ms": round(facts.floor_ms(attn_bytes + score_bytes
                                              / sparsity.reuse_interval), 4),
             **({"attention_ms_by_blocks": swept} if swept else {})}]


def selector(sparsity, blocks=None, tuning=SelectTuning()):
    """select_pages of one layer under `sparsity`: (q, kmin, kmax, table, lengths, modes)."""
    def select(q, kmin, kmax, table, lengths, modes):
        return select_pages(q, kmin, kmax, table, lengths, modes, layer=0,
                            width=sparsity.selection_width, page_size=sparsity.page_size,
                            group_reduce=group_reduce(sparsity), blocks=blocks, tuning=tuning,
                            interpret=not ON_GPU, **select_kwargs(sparsity, HEAD_DIM, G))
    return select


def stats_bytes(kmin, modes, b, pages):
    """Page statistics (kmin + kmax) the SELECT heads of one layer read: [L=1, K] modes."""
    return 2 * kmin[0].nbytes * b * int(jnp.sum(modes == SELECT)) * pages


def select_sweep(b, t, modes, reps, iters, key):
    """Selection alone (lserve_query_head) for each (ScoreBlocks, SelectTuning) of
    SELECT_SWEEP; blocks None is ScoreBlocks.for_shape."""
    sparsity = LSERVE
    _, _, table, kmin, kmax = paged_layer(b, t, sparsity.page_size, sparsity.logical_page_size,
                                          key)
    q = jax.random.normal(jax.random.key(9), (b, KV_HEADS, G, HEAD_DIM), jnp.bfloat16)
    lengths = jnp.full((b,), t, jnp.int32)
    table, modes = table[:, None], modes[None]
    moved = stats_bytes(kmin, modes, b, t // sparsity.page_size)
    rows = []
    for blocks, tuning in SELECT_SWEEP:
        ms = time_per_call(selector(sparsity, blocks, tuning), reps, iters, q, kmin, kmax,
                           table, lengths, modes, chain=False)
        rows.append({"batch": b, "context": t, "blocks": str(blocks),
                     "tuning": f"select.radix_bits={tuning.radix_bits}",
                     "ms": round(ms, 4), "gbps": round(moved / ms / 1e6, 1)})
        print(rows[-1], flush=True)
    return rows


def dense_paged(q, k_pool, v_pool, table, blocks=None):
    """Our kernel with every head DENSE over the whole table."""
    b, kh, m = table.shape
    selected = jnp.full((1, b, kh, 1, 16), -1, jnp.int32)
    modes = jnp.full((1, kh), DENSE, jnp.int32)
    lengths = jnp.full((b,), m * k_pool.shape[1], jnp.int32)
    return sparse_decode(q, k_pool, v_pool, table[:, None], selected, lengths, modes, layer=0,
                         sink=0, local=0, budget_pages=m, blocks=blocks, interpret=not ON_GPU)


def dense_rows(b, t, reps, iters, key, facts: DeviceFacts, sweep=()):
    k_pool, v_pool, table, _, _ = paged_layer(b, t, 64, 16, key)
    q = jax.random.normal(jax.random.key(9), (b, KV_HEADS, G, HEAD_DIM), jnp.bfloat16)
    keys, values = contiguous(k_pool, table), contiguous(v_pool, table)
    q4 = q.reshape(b, 1, N_HEADS, HEAD_DIM)
    floor = facts.floor_ms(2 * keys.nbytes)
    rows = []
    for impl in ("cudnn", "xla") if ON_GPU else ("xla",):
        def run(q4, keys, values, impl=impl):
            return jax.nn.dot_product_attention(q4, keys, values, implementation=impl)
        ms = time_per_call(run, reps, iters, q4, keys, values)
        rows.append({"name": f"dense_{impl}", "policy": "dense", "batch": b, "context": t,
                     "ms": round(ms, 4), "gbps": round(2 * keys.nbytes / ms / 1e6, 1),
                     "floor_ms": round(floor, 4)})
    del keys, values
    for blocks in (None, *sweep):
        ms = time_per_call(functools.partial(dense_paged, blocks=blocks), reps, iters, q,
                           k_pool, v_pool, table)
        rows.append({"name": "dense_paged_kernel" if blocks is None else "sweep_dense_paged",
                     "policy": "dense", "batch": b, "context": t, "ms": round(ms, 4),
                     "gbps": round(2 * k_pool.nbytes / ms / 1e6, 1),
                     "floor_ms": round(floor, 4), "blocks": str(blocks)})
    base = rows[0]["ms"]
    for row in rows:
        row.update(baseline_ms=base, speedup=round(base / row["ms"], 2))
    return rows


SWEEP = [DecodeBlocks(pages_per_block=ppb, pages_per_split=pps, num_warps=4, num_stages=st)
         for ppb, pps in ((1, 16), (1, 32), (1, 64), (2, 32)) for st in (2, 3, 4)]
SPARSE_SWEEP = [DecodeBlocks(pages_per_block=ppb, pages_per_split=pps, num_warps=4,
                             num_stages=st)
                for ppb, pps in ((1, 2), (1, 4), (1, 8), (1, 16), (1, 64), (2, 16), (4, 64))
                for st in (2, 3)]  # 2 and 4: small batches are latency-bound (fewer steps each)
SELECT_SHAPES = [(1, 262144), (8, 131072), (1, 32768)]
# score blocks are timed with the default top-k, radix widths with the default blocks
SELECT_SWEEP = ([(ScoreBlocks(pages_per_block=ppb, pages_per_program=ppp, num_warps=w),
                  SelectTuning())
                 for ppb in (16, 32) for ppp in (32, 64, 128, 256) for w in (4, 8)]
                + [(None, SelectTuning(radix_bits=bits)) for bits in (1, 2, 4)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="results folder (default: experiments/results/<device>)")
    parser.add_argument("--reps", type=int, default=32, help="calls per timed jit (layers)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--shapes", nargs="+", default=None, help="BATCHxCONTEXT, e.g. 8x131072")
    parser.add_argument("--sweep", action="store_true", help="also sweep dense kernel blocks")
    parser.add_argument("--sweep-select", action="store_true",
                        help="also sweep selection blocks and radix widths (select_sweep)")
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    facts = benchlib.measure_device()
    half = jnp.asarray([STREAM] * 4 + [SELECT] * 4, jnp.int8)  # 50% streaming heads
    everywhere = jnp.full((KV_HEADS,), SELECT, jnp.int8)
    variants = [("lserve_query_head", LSERVE, half),
                ("lserve_kv_head", dataclasses.replace(LSERVE, selection_granularity="kv_head"),
                 half),
                ("quest_query_head", QUEST, everywhere)]
    rows = []
    for b, t in shapes:
        key = jax.random.key(b * 7 + t)
        try:
            sweep = SWEEP if args.sweep and (b, t) in ((8, 131072), (1, 262144)) else ()
            dense = dense_rows(b, t, args.reps, args.iters, key, facts, sweep)
        except Exception as err:  # e.g. out of memory: report it, keep going
            rows.append({"name": "dense", "batch": b, "context": t, "error": repr(err)[:300]})
            print(rows[-1], flush=True)
            continue
        rows += dense
        for row in dense:
            print(row, flush=True)
        for name, sparsity, modes in variants:
            try:
                new = sparse_rows(name, sparsity, modes, b, t, args.reps, args.iters, key,
                                  dense[0]["ms"], facts,
                                  SPARSE_SWEEP if sweep and name.startswith("lserve") else ())
            except Exception as err:
                new = [{"name": name, "batch": b, "context": t, "error": repr(err)[:300]}]
            rows += new
            print(new[0], flush=True)
        write(rows, args.out, facts)
    swept = []
    select_shapes = (shapes if args.shapes else SELECT_SHAPES) if args.sweep_select else ()
    for b, t in select_shapes:
        try:
            swept += select_sweep(b, t, half, args.reps, args.iters, jax.random.key(b * 7 + t))
        except Exception as err:  # e.g. out of memory: report it, keep going
            swept.append({"batch": b, "context": t, "error": repr(err)[:300]})
            print(swept[-1], flush=True)
        write(rows, args.out, facts, swept)
    print("wrote", write(rows, args.out, facts, swept))


def write(rows, out, facts: DeviceFacts, select_rows=()):
    extra = {"select_sweep": list(select_rows)} if select_rows else {}
    return benchlib.write_results("decode_attention", rows, out, facts, **extra,
                                  shape="32 q heads, 8 KV heads, d 128, bf16, one layer",
                                  lserve="50% streaming heads (128 + 256), budget 4096, N_P 64, "
                                         "N_L 16, R 4", quest="flat pages of 16, budget 4096, R 1")


if __name__ == "__main__":
    main()
