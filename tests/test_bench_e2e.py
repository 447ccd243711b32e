"""The end-to-end benchmark: kernel tuning swept through the engine (`--vary`, `--rows`), its
floor, its out-of-memory decision and a toy run on the CPU."""

import functools
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from experiments import bench_e2e, benchlib
from lserve_jax.attention import KernelTuning, backends
from lserve_jax.config import CacheConfig, ModelConfig, SparsityConfig
from lserve_jax.engine import Engine
from lserve_jax.model.llama import init_params
from lserve_jax.sparsity.policy import SELECT, STREAM, attended_tokens
from pallas_kernels.page_select import kernel as select_kernel
from pallas_kernels.sparse_decode import kernel as decode_kernel
from pallas_kernels.sparse_decode import merge as decode_merge

MODULES = (decode_kernel, decode_merge, select_kernel, backends, bench_e2e, benchlib)


def _pallas_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from _pallas_calls(inner)


def _tiny_shapes():
    """The tiny model's config and parameter shapes (enough to build and trace an engine)."""
    cfg = ModelConfig.from_name("tiny")
    return cfg, jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def _decode_splits(setting: benchlib.Setting) -> set[int]:
    """Key splits of the decode kernel's grid (the one 4-D grid: B, K, lists, splits) in the
    benchmark's decode loop of an engine built with the setting's tuning."""
    cfg, params = _tiny_shapes()
    engine = Engine(cfg, params, SparsityConfig(policy="dense"),
                    CacheConfig(max_seq_len=2048, max_batch=1), tuning=setting.tuning)
    loop = bench_e2e.decode_loop(engine, "pallas_interpret", 2)
    jaxpr = jax.make_jaxpr(loop)(params, engine.cache, *bench_e2e.decode_args(1, engine.modes))
    grids = [eqn.params["grid_mapping"].grid for eqn in _pallas_calls(jaxpr.jaxpr)]
    return {grid[-1] for grid in grids if len(grid) == 4}


def test_a_varied_knob_reaches_the_engines_decode_kernel_and_mutates_nothing():
    before = [dict(vars(module)) for module in MODULES]
    one, eight = benchlib.parse_sweep("decode.min_pages_per_split=1,8", "--vary")
    assert one.label == "decode.min_pages_per_split=1"
    assert one.tuning == KernelTuning(decode=decode_kernel.DecodeTuning(min_pages_per_split=1))
    # 32 pages listed; on this 2-program grid a floor of 8 relaxes to 2 (min_programs)
    assert _decode_splits(one) == {32} and _decode_splits(eight) == {16}
    after = [dict(vars(module)) for module in MODULES]
    for module, old, new in zip(MODULES, before, after):
        assert old.keys() == new.keys(), module.__name__
        assert all(new[name] is value for name, value in old.items()), module.__name__
    assert KernelTuning() == KernelTuning(decode_kernel.DecodeTuning(),
                                          select_kernel.SelectTuning())


def test_an_unknown_or_invalid_knob_is_refused_naming_the_flag_and_the_known_ones():
    with pytest.raises(SystemExit, match="--vary.*select.topk_warps"):
        benchlib.parse_sweep("WARPS=4,8", "--vary")
    with pytest.raises(SystemExit, match="--vary.*power of two"):
        benchlib.parse_sweep("decode.num_warps=3", "--vary")
    with pytest.raises(SystemExit, match="--vary.*integer values"):
        benchlib.parse_sweep("decode.num_warps=four", "--vary")


def test_rows_parse_with_and_without_knobs_and_refuse_what_they_cannot_read():
    assert bench_e2e.parse_row("dense:1x4096") == ("dense", 1, 4096, benchlib.Setting())
    policy, batch, context, setting = bench_e2e.parse_row(
        "lserve:4x131072:select.topk_warps=8:decode.num_stages=2")
    assert (policy, batch, context) == ("lserve", 4, 131072)
    assert setting.label == "select.topk_warps=8,decode.num_stages=2"
    assert (setting.tuning.select.topk_warps, setting.tuning.decode.num_stages) == (8, 2)
    for bad in ("dense", "dense:1by4096", "dense:1x4096:select.topk_warps=8:x"):
        with pytest.raises(SystemExit, match="POLICY:BATCHxCONTEXT"):
            bench_e2e.parse_row(bad)
    with pytest.raises(SystemExit, match="--rows.*select.topk_warps"):
        bench_e2e.parse_row("dense:1x4096:WARPS=8")


def test_speedups_compare_rows_of_the_same_tuning():
    rows = [{"name": "decode_dense", "policy": "dense", "batch": 1, "context": 8, "ms": 4.0,
             "tuning": f"select.topk_warps={w}"} for w in (4, 8)]
    rows[1]["ms"] = 8.0
    rows += [{**r, "name": "decode_lserve", "policy": "lserve", "ms": 2.0} for r in rows]
    assert [r["speedup"] for r in bench_e2e._with_baselines(rows)] == [1.0, 1.0, 2.0, 4.0]


def _bench(memory_bytes: int, **kw) -> bench_e2e.Bench:
    cfg, params = _tiny_shapes()
    facts = benchlib.DeviceFacts(1e11, 1e12, memory_bytes, "test")
    return bench_e2e.Bench(cfg, params, 10**6, np.ones((cfg.n_layers, cfg.n_kv_heads)), facts,
                           "reference", steps=2, **kw)


def test_out_of_memory_is_decided_by_the_measured_device_memory():
    sparsity = SparsityConfig().for_policy("dense")
    row = bench_e2e.decode_row(_bench(2**20), "dense", sparsity, 4, 4096)
    assert row["error"].startswith("out of memory") and "ms" not in row
    _, params = _tiny_shapes()
    held = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
    per_seq = 4096 * 2 * 2 * 2 * 16 * 4  # tokens, layers, K and V, KV heads, head dim, f32
    capacity = bench_e2e.capacity_row(_bench(2**30 + 8 * 2**30), "dense", sparsity, 4096)
    assert capacity["max_batch_computed"] == (2**30 - held) // per_seq
    for kv, per_token in (("int8", 16), ("int4", 16)):  # int4: 8 bytes of codes + 8 of scales
        row = bench_e2e.capacity_row(_bench(2**30 + 8 * 2**30, kv_dtype=kv), "dense",
                                     sparsity, 4096)
        assert row["max_batch_computed"] == (2**30 - held) // (per_seq // 64 * per_token)
    small = bench_e2e.capacity_row(_bench(3 * per_seq + held + 8 * 2**30, kv_dtype="int8",
                                          allocate=True), "dense", sparsity, 4096)
    assert small["max_batch_computed"] == 12  # int8 codes: a quarter of the f32 bytes
    assert small["allocated_bytes"] >= 12 * per_seq // 4


def test_a_toy_run_on_the_cpu_records_the_measured_device(tmp_path):
    (tmp_path / "gates.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    bench_e2e.main(["--model", "tiny", "--backend", "reference", "--pattern",
                    str(tmp_path / "gates.tsv"), "--policies", "dense", "--decode", "1x256",
                    "--ttft", "--capacity", "4096", "--steps", "2", "--out", str(tmp_path),
                    "--precision", "auto/auto", "fp8/int4"])
    result = json.loads((tmp_path / "e2e.json").read_text())
    assert result["device"] == "cpu" and "CPU smoke probe" in result["device_facts_method"]
    assert result["measured_bandwidth_gbps"] > 0 and result["device_memory_gib"] > 0
    rows = {(r["name"], r["weights"], r["kv_dtype"]): r for r in result["rows"]}
    assert len(rows) == 4 and not any("error" in r for r in rows.values())
    decode, fp8 = rows[("decode_dense", "auto", "auto")], rows[("decode_dense", "fp8", "int4")]
    assert decode["ms"] > 0 and decode["floor_ms"] > 0 and "tuning" not in decode
    # the f32 toy model (head dim 16): 64 bytes a token and head; int4: 8 of codes + 8 of
    # scale and zero point
    assert fp8["kv_bytes_per_seq"] == decode["kv_bytes_per_seq"] // 4
    assert fp8["floor_ms"] < decode["floor_ms"]
    assert "gemms" in fp8 and fp8["temp_bytes"] >= 0
    capacity = [r for r in rows.values() if r["name"] == "capacity_dense"]
    assert all(r["max_batch_computed"] > 0 for r in capacity)


def test_the_gemm_report_counts_gemm_calls_and_shows_a_materialised_upcast():
    import jax.numpy as jnp

    w = jnp.zeros((512, 1024), jnp.float8_e4m3fn)
    x = jnp.zeros((1, 512), jnp.bfloat16)
    upcast = jax.jit(lambda x, w: x @ w.astype(jnp.bfloat16)).lower(x, w).compile()
    report = bench_e2e.gemm_report(upcast)
    assert report["gemms"] == {}  # the CPU runs no cuBLAS
    assert report["temp_bytes"] >= 512 * 1024 * 2  # the bf16 copy of the weight, at least


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
    engine = SimpleNamespace(modes=modes, cache=SimpleNamespace(
        selected=lists, lengths=np.array([context])))
    base = attended_tokens(modes, context, sparsity)
    tokens, pages = bench_e2e.read_tokens(engine, context, sparsity)
    assert pages == 2 * (budget - 1) - 10 + 1
    assert tokens == pytest.approx(base + 0.5 * (budget - 11) * n_p)
    anchored = lists.copy()  # a list ending with the current page (its anchor) counts it once
    anchored[0, 0, 0, 0, budget - 1] = (context - 1) // n_p
    engine.cache.selected = anchored
    assert bench_e2e.read_tokens(engine, context, sparsity)[1] == pages
    engine.cache.selected = lists
    engine.cache.selected = lists[:, :, :, :1]
    assert bench_e2e.read_tokens(engine, context, sparsity) == (base, budget)
    assert bench_e2e.read_tokens(engine, budget * n_p, sparsity)[1] is None
