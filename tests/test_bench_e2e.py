"""The end-to-end benchmark's in-process sweep of kernel constants (`--vary`) and its floor."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_e2e
from lserve_jax.config import SparsityConfig
from lserve_jax.sparsity.policy import SELECT, STREAM, attended_tokens
from pallas_kernels.sparse_decode import kernel
from pallas_kernels.sparse_decode.api import sparse_decode


def _splits(q, pool, table, selected, lengths, modes) -> int:
    """Key splits of the decode kernel's grid, read from its traced pallas_call."""
    jaxpr = jax.make_jaxpr(lambda *a: sparse_decode(
        *a, layer=0, sink=16, local=64, budget_pages=4, interpret=True))(
        q, pool, pool, table, selected, lengths, modes)
    return next(_pallas_calls(jaxpr.jaxpr)).params["grid_mapping"].grid[-1]


def _pallas_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _pallas_calls(inner)


def test_a_varied_kernel_constant_reaches_the_kernel_and_is_restored():
    before = kernel.MIN_PAGES_PER_SPLIT
    q = jnp.zeros((1, 2, 4, 128), jnp.bfloat16)
    pool = jnp.zeros((64, 64, 128), jnp.bfloat16)  # 64-token pages: one per loop step
    table = jnp.zeros((1, 1, 2, 32), jnp.int32)
    selected = jnp.full((1, 1, 2, 1, 4), -1, jnp.int32)
    args = (q, pool, table, selected, jnp.array([500], jnp.int32), jnp.zeros((1, 2), jnp.int32))

    def row(*_):
        return {"ms": 1.0, "splits": _splits(*args)}

    assert bench_e2e.with_knob(row, None) is row
    one, eight = (bench_e2e.with_knob(row, knob)()
                  for knob in bench_e2e.parse_vary("MIN_PAGES_PER_SPLIT=1,8"))
    assert one["knob"] == "MIN_PAGES_PER_SPLIT=1" and eight["knob"] == "MIN_PAGES_PER_SPLIT=8"
    # 32 pages listed; on this 2-program grid a floor of 8 relaxes to 2 (MIN_PROGRAMS)
    assert one["splits"] == 32 and eight["splits"] == 16
    assert kernel.MIN_PAGES_PER_SPLIT == before


def test_an_unknown_knob_is_refused_with_the_known_ones():
    with pytest.raises(SystemExit, match="TOPK_WARPS"):
        bench_e2e.parse_vary("WARPS=4,8")


def test_rows_parse_with_and_without_a_knob_and_refuse_what_they_cannot_read():
    assert bench_e2e.parse_row("dense:1x4096") == ("dense", 1, 4096, None)
    assert bench_e2e.parse_row("lserve:4x131072:TOPK_WARPS=8") == (
        "lserve", 4, 131072, ("TOPK_WARPS", 8))
    for bad in ("dense", "dense:1by4096", "dense:1x4096:TOPK_WARPS=8:x"):
        with pytest.raises(SystemExit, match="POLICY:BATCHxCONTEXT"):
            bench_e2e.parse_row(bad)
    with pytest.raises(SystemExit, match="TOPK_WARPS"):
        bench_e2e.parse_row("dense:1x4096:WARPS=8")


def test_speedups_compare_rows_of_the_same_knob_value():
    rows = [{"name": "decode_dense", "policy": "dense", "batch": 1, "context": 8, "ms": 4.0,
             "knob": f"TOPK_WARPS={w}"} for w in (4, 8)]
    rows[1]["ms"] = 8.0
    rows += [{**r, "name": "decode_lserve", "policy": "lserve", "ms": 2.0} for r in rows]
    assert [r["speedup"] for r in bench_e2e._with_baselines(rows)] == [1.0, 1.0, 2.0, 4.0]


def test_policy_variants_change_one_default():
    configs = bench_e2e.policies(["lserve", "lserve_kv"], chunk=0)
    assert configs["lserve_kv"].policy == "lserve"
    assert configs["lserve_kv"].selection_granularity == "kv_head"
    assert configs["lserve"].selection_granularity == "query_head"
    assert configs["lserve_kv"] == configs["lserve"].__class__(
        **{**vars(configs["lserve"]), "selection_granularity": "kv_head"})


def test_the_floor_counts_the_union_of_a_groups_lists():
    """Query-head lists of a selecting head are read as their union; one list per KV head (or a
    context inside the budget) keeps `attended_tokens`."""
    sparsity = SparsityConfig().for_policy("lserve")
    budget, n_p = sparsity.budget_pages, sparsity.page_size
    modes = np.array([[SELECT, STREAM]])  # [L, K]
    context = 4 * budget * n_p
    first = np.arange(budget - 1)
    second = np.concatenate([first[:10], 1000 + np.arange(budget - 11)])  # shares 10 pages
    lists = np.full((1, 1, 2, 2, budget), -1)  # [L, B, K, Gs, W]
    lists[0, 0, 0, 0, :budget - 1], lists[0, 0, 0, 1, :budget - 1] = first, second
    engine = SimpleNamespace(modes=modes, cache=SimpleNamespace(selected=lists))
    base = attended_tokens(modes, context, sparsity)
    tokens, pages = bench_e2e.read_tokens(engine, context, sparsity)
    assert pages == 2 * (budget - 1) - 10 + 1
    assert tokens == pytest.approx(base + 0.5 * (budget - 11) * n_p)
    engine.cache.selected = lists[:, :, :, :1]
    assert bench_e2e.read_tokens(engine, context, sparsity) == (base, budget)
    assert bench_e2e.read_tokens(engine, budget * n_p, sparsity)[1] is None
