"""The sharded program: the Pallas kernels per device, the compiled decode step's collectives
(none moves the KV pools), its CUDA lowering, int8's cross-device scale, and the vocabulary's
split."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lserve_jax.cache.paged import cache_specs
from lserve_jax.config import Backend
import lserve_jax.engine.steps as steps
from pallas_kernels.layout import STREAM
from pallas_kernels.paged_write.reference import write_tokens_reference
from pallas_kernels._compat import abstract_gpu, abstract_gpu_mesh
from tests.conftest import TOLERANCE
from tests.multidevice.test_tensor_parallel import CFG, _single, close, engine, outputs

# an HLO instruction's result type and opcode: `%name = f32[161,8,16]{2,1,0} copy(...`
INSTRUCTION = re.compile(r"= (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")
MOVES = ("copy", "copy-start", "all-gather", "all-gather-start", "all-to-all",
         "collective-permute", "collective-permute-start", "reduce-scatter")


def instructions(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(opcode, result shape) of every instruction with an array result."""
    return [(m.group(3), tuple(int(d) for d in m.group(2).split(",") if d))
            for m in INSTRUCTION.finditer(hlo)]


@pytest.mark.parametrize("tp,backend", [(8, Backend.reference), (2, Backend.pallas_interpret)])
def test_decode_step_never_moves_the_kv_pools(tp, backend):
    """The compiled decode chunk on each device holds only its block of the pools and
    statistics (the whole pool's shape appears nowhere), never copies, gathers or permutes
    them, and all-reduces after the row-parallel projections."""
    eng = engine("lserve", tp, 1, backend)
    state = steps.SlotState.greedy(eng.cache_cfg.max_batch)
    hlo = steps.decode.lower(CFG, eng.attention, 8, eng.params, eng.cache, state,
                             eng._modes).compile().as_text()
    ops = instructions(hlo)
    pool, stats = eng.cache.k.shape, eng.cache.kmin.shape
    local = {(pool[0] // tp,) + pool[1:], (stats[0] // tp,) + stats[1:]}
    assert {shape for _, shape in ops} & local == local
    assert not [shape for _, shape in ops if shape in (pool, stats)]
    moved = [(op, shape) for op, shape in ops if op in MOVES and shape[-2:] == pool[-2:]]
    assert not moved
    assert sum(op.startswith("all-reduce") for op, _ in ops) >= 2 * CFG.n_layers


def test_pallas_kernels_per_device(monkeypatch):
    """The Pallas kernels (interpreted) under shard_map at TP = 2 give the tokens and logits
    of one device (its reference backend: the kernels equal their references)."""
    one = _single("lserve")
    two = outputs("lserve", 2, 1, monkeypatch, Backend.pallas_interpret)
    assert two["tokens"] == one["tokens"]
    assert close(two["decode"], one["decode"]) < TOLERANCE["float32"]
    assert close(two["prefill"], one["prefill"]) < TOLERANCE["float32"]


def test_int8_scale_is_taken_across_the_devices():
    """int8 KV keeps one scale per (row, layer) across all KV heads: a prompt written by TP = 4
    devices (each its own heads and pages) gets the scale one device computes over all heads,
    and the same codes."""
    cfg = CFG
    modes = jnp.zeros((cfg.n_layers, cfg.n_kv_heads), jnp.int8)  # dense
    one = engine("dense", 1, 1, kv_dtype="int8")
    four = engine("dense", 4, 1, kv_dtype="int8")
    prompt = jax.random.normal(jax.random.key(3), (2, 24, cfg.n_kv_heads, cfg.head_dim))
    prompt = prompt * jnp.arange(1, cfg.n_kv_heads + 1)[:, None]  # heads of different ranges
    new_lens = jnp.asarray([24, 17, 0, 0], jnp.int32)
    k = jnp.zeros((4,) + prompt.shape[1:]).at[:2].set(prompt)

    def write(eng, head_axis):
        table = np.zeros(eng.cache.page_table.shape, np.int32)  # rows 2, 3: trash page
        table[:2] = [eng.pages.reserve(24)[0] for _ in range(2)]
        cache = dataclasses.replace(eng.cache, page_table=jax.device_put(
            table, eng.cache.page_table.sharding))

        def body(cache, k, new_lens, modes):
            return write_tokens_reference(
                cache.k, cache.v, cache.kmin, cache.kmax, cache.page_table[:, 0],
                cache.lengths, k, k, new_lens, modes[0] == STREAM,
                sink_pages=eng.sparsity.sink_pages, ring_pages=eng.sparsity.ring_pages,
                stats=False, layer=0, head_axis=head_axis)[0]

        if eng.mesh is None:
            return body(cache, k, new_lens, modes), table
        specs = cache_specs(cache)
        run = jax.shard_map(body, mesh=eng.mesh, in_specs=(specs, P("dp", None, "tp"), P("dp"),
                                                            P(None, "tp")),
                            out_specs=specs.k, check_vma=False)
        return run(cache, k, new_lens, modes), table

    (pool1, table1), (pool4, table4) = write(one, None), write(four, "tp")
    np.testing.assert_array_equal(np.asarray(pool4.scale), np.asarray(pool1.scale))
    assert float(pool1.scale[0, 0, 0]) == float(pool1.scale[0, 0, -1]) > 0
    per_device = four.cache.k.codes.shape[0] // 4
    codes1, codes4 = np.asarray(pool1.codes), np.asarray(pool4.codes)
    for head in range(cfg.n_kv_heads):
        base = head // (cfg.n_kv_heads // 4) * per_device
        for row in range(2):
            np.testing.assert_array_equal(codes4[base + table4[row, 0, head, :3]],
                                          codes1[table1[row, 0, head, :3]])


def test_whole_vocabulary_costs_its_bytes_on_every_device():
    """shard_vocab=False keeps the embedding and head whole on every device (its results:
    test_tensor_parallel's whole_vocab case): device 0 holds (tp - 1) / tp of their bytes
    more."""
    def device0_bytes(eng):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(eng.params)
                   for s in leaf.addressable_shards if s.device == jax.devices()[0])

    vocab_bytes = 2 * CFG.vocab_size * CFG.dim * 4  # embed + lm_head, f32
    extra = device0_bytes(engine("lserve", 4, 1, shard_vocab=False)) - device0_bytes(
        engine("lserve", 4, 1))
    assert extra == vocab_bytes * 3 // 4


def test_tensor_parallel_decode_lowers_for_cuda():
    """The TP = 2 decode loop with the Pallas Triton kernels lowers for CUDA over an abstract
    1 x 2 GPU mesh, inside shard_maps (manual computations): every kernel sees one device's
    block of the pools, never the whole pool."""
    eng = engine("lserve", 2, 1, Backend.pallas)
    mesh = abstract_gpu_mesh((1, 2), ("dp", "tp"), axis_type=AxisType.Auto)

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, x.sharding.spec))

    attention = dataclasses.replace(eng.attention, mesh=mesh)
    params, cache = (jax.tree.map(abstract, t) for t in (eng.params, eng.cache))
    with abstract_gpu(mesh):
        hlo = jax.jit(steps.decode, static_argnums=(0, 1, 2)).trace(
            CFG, attention, 4, params, cache, steps.SlotState.greedy(4),
            jnp.asarray(eng.modes)).lower(lowering_platforms=("cuda",)).as_text()
    pool = eng.cache.k.shape

    def text(shape):
        return "tensor<" + "x".join(map(str, shape))

    kernels = [f for f in hlo.split("func.func")[1:] if "__gpu$xla.gpu.triton" in f]
    assert len(kernels) >= 4 and "sdy.manual_computation" in hlo
    assert not [f for f in kernels if text(pool) in f]
    assert [f for f in kernels if text((pool[0] // 2,) + pool[1:]) in f]
