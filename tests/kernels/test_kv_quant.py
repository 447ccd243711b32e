"""Quantized KV pages: the quantize/dequantize math, the writes (reference scatter, aligned
prefill write, fused decode append) and the decode kernel against its reference, for every
format, on NaN-poisoned pools with ragged lengths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv_quant
from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.kv_quant import QuantizedPool
from pallas_kernels.paged_write.api import append_decode, write_tokens
from pallas_kernels.paged_write.reference import append_rotated_reference, write_tokens_reference
from pallas_kernels.sparse_decode.api import query_rows, sparse_decode
from pallas_kernels.sparse_decode.kernel import DecodeBlocks
from pallas_kernels.sparse_decode.reference import sparse_decode_reference
from tests.kernels.conftest import INTERPRET
from tests.kernels.test_sparse_decode import BUDGET, LOCAL, SINK, _case

FORMATS = ("int8", "fp8", "int8_token", "int4")


@pytest.mark.parametrize("kind", FORMATS)
def test_quantize_round_trip_is_within_half_a_step(kind):
    x = jax.random.normal(jax.random.key(0), (6, 5, 1, 32), jnp.float32) * 3  # [B, T, K, H]
    if kind in kv_quant.STATIC:
        scale = kv_quant.calibrate(jnp.ones((6, 1)), kind, x, jnp.zeros(6, jnp.int32),
                                   jnp.full(6, 5, jnp.int32))  # [B, K]
        amax = np.abs(np.asarray(x)).max(axis=(1, 3))
        levels = 127 if kind == "int8" else kv_quant.FP8_MAX
        np.testing.assert_allclose(np.asarray(scale), amax / levels, rtol=1e-6)
        codes = kv_quant.quantize_static(x, scale[:, None, :, None], kind)
        back = kv_quant.dequantize(codes, scale[:, None, :], None, kind)
        # int8: half of absmax / 127; fp8: 3 mantissa bits, 2^-4 of the value at worst
        bound = (np.asarray(scale)[:, None, :, None] / 2 if kind == "int8"
                 else np.abs(np.asarray(x)) / 16) + 1e-6
    else:
        codes, scale, zero = kv_quant.quantize_token(x, kind)
        assert codes.shape[-1] == (16 if kind == "int4" else 32) and codes.dtype == jnp.uint8
        back = kv_quant.dequantize(codes, scale, zero, kind)
        bound = np.asarray(scale)[..., None] / 2 + 1e-6
    assert np.all(np.abs(np.asarray(back) - np.asarray(x)) <= bound)


def test_int4_packs_channel_i_low_and_i_plus_half_high():
    x = jnp.asarray([[0.0] * 4 + [15.0] * 4])  # min 0, max 15: codes equal the values
    codes, scale, zero = kv_quant.quantize_token(x, "int4")
    assert float(scale[0]) == 1.0 and float(zero[0]) == 0.0
    assert np.asarray(codes).tolist() == [[0xF0] * 4]


def test_calibration_sets_only_starting_rows():
    x = jax.random.normal(jax.random.key(1), (3, 4, 2, 8))
    old = jnp.full((3, 2), 7.0)
    lengths, new_lens = jnp.asarray([0, 5, 0]), jnp.asarray([3, 2, 0])
    for kind in ("int8", "fp8"):
        scale = np.asarray(kv_quant.calibrate(old, kind, x, lengths, new_lens))
        assert (scale[1:] == 7.0).all(), "a running or idle row keeps its scales"
        per_head = np.abs(np.asarray(x)[0, :3]).max(axis=(0, 2))
        want = per_head.max() / 127 if kind == "int8" else per_head / kv_quant.FP8_MAX
        np.testing.assert_allclose(scale[0], np.broadcast_to(want, (2,)), rtol=1e-6)


def quantized_pools(kind, k_pool, v_pool, key, n_layers, b, kh):
    """Random codes and scales shaped as `kind`'s, NaN scales on the poisoned pages (where
    the float pools are NaN) and the largest code there."""
    p, n_p, h = k_pool.shape
    poisoned = np.isnan(np.asarray(k_pool, np.float32)).any(axis=(1, 2))
    keys = jax.random.split(key, 4)
    pools = []
    for i in range(2):
        if kind in kv_quant.STATIC:
            values = jax.random.normal(keys[i], (p, n_p, h)) * 40
            codes = kv_quant.quantize_static(values, 1.0, kind)
            scale = jax.random.uniform(keys[2 + i], (n_layers, b, kh), minval=0.01, maxval=0.05)
        else:
            width = h // 2 if kind == "int4" else h
            top = 15 if kind == "int4" else 255
            codes = jax.random.randint(keys[i], (p, n_p, width), 0, top + 1).astype(jnp.uint8)
            if kind == "int4":
                codes = codes | (jax.random.randint(keys[2 + i], codes.shape, 0, 16)
                                 .astype(jnp.uint8) << 4)
            scale = jnp.stack([jax.random.uniform(keys[2 + i], (p, n_p), minval=0.01,
                                                  maxval=0.2),
                               jax.random.normal(keys[i], (p, n_p))], axis=1)
            scale = jnp.where(poisoned[:, None, None], jnp.nan, scale)
        if jnp.issubdtype(codes.dtype, jnp.integer):
            codes = jnp.where(poisoned[:, None, None], jnp.iinfo(codes.dtype).max, codes)
        pools.append(QuantizedPool(codes.astype(kv_quant.code_dtype(kind)), scale, kind))
    return pools


@pytest.mark.parametrize("kind, g, page_size, gs", [("fp8", 8, 64, 8), ("int4", 4, 16, 1)])
def test_decode_kernel_matches_reference_on_quantized_pages(kind, g, page_size, gs):
    """A static format (fp8: int8 differs only in the codes' dtype) and a per-token one (int4:
    int8_token differs only in not unpacking nibbles), GQA 8 / 4, 64- and 16-token pages, a
    list per query head and per KV head; each case takes seconds interpreted. Every format is
    lowered for CUDA below."""
    q, k_pool, v_pool, table, selected, lengths, modes = _case(g, page_size, gs, jnp.bfloat16,
                                                               seed=g + page_size)
    kq, vq = quantized_pools(kind, k_pool, v_pool, jax.random.key(g), modes.shape[0],
                             q.shape[0], q.shape[1])
    args = (q, kq, vq, table, selected, lengths, modes)
    kw = dict(sink=SINK, local=LOCAL, budget_pages=BUDGET)
    blocks = DecodeBlocks.for_shape(page_size, 8, 1, block_tokens=32)
    # layer 0 has a dense, a streaming and a selecting head
    ref = np.asarray(sparse_decode_reference(*args, layer=0, **kw), np.float32)
    out = np.asarray(sparse_decode(*args, layer=0, **kw, blocks=blocks, interpret=INTERPRET),
                     np.float32)
    assert np.isfinite(out).all(), "NaN leaked from a poisoned page"
    # bf16 pages' tolerance plus one more bf16 rounding: the kernel dequantizes a tile to bf16
    # for the dots, the reference stays in f32
    assert np.abs(out - ref).max() / max(1.0, np.abs(ref).max()) <= 3e-2


@pytest.mark.parametrize("kind", FORMATS)
def test_decode_kernel_lowers_for_cuda_in_every_format(kind):
    q, k_pool, v_pool, table, selected, lengths, modes = _case(4, 16, 4, jnp.bfloat16, seed=1)
    kq, vq = quantized_pools(kind, k_pool, v_pool, jax.random.key(0), modes.shape[0],
                             q.shape[0], q.shape[1])
    lower_for_cuda(lambda *a: sparse_decode(*a, layer=1, sink=SINK, local=LOCAL,
                                            budget_pages=BUDGET),
                   q, kq, vq, table, selected, lengths, modes)


def _write_case(kind, page_size, key):
    b, k, h, m = 4, 2, 32, 6
    p = 1 + 2 * b * k * m
    pools = [kv_quant.empty_pool(kind, p, page_size, h, n_layers=2, batch=b, n_kv=k,
                                 dtype=jnp.bfloat16, fill=float("nan")) for _ in range(2)]
    if kind in kv_quant.STATIC:  # rows already running: their scales were set by a prompt
        pools = [dataclasses.replace(x, scale=jnp.full(x.scale.shape, 0.02)) for x in pools]
    stat = [jnp.full((p, page_size // 16, h), jnp.nan, jnp.bfloat16) for _ in range(2)]
    order = np.random.default_rng(page_size).permutation(np.arange(1, p))
    table = jnp.asarray(order[: b * k * m].reshape(b, k, m), jnp.int32)
    return pools, stat, table, (b, k, h)


@pytest.mark.parametrize("kind", FORMATS)
def test_decode_append_quantizes_like_the_reference(kind):
    """The fused append's codes dequantize to the reference's values within one quantization
    step (the rotation's f32 products may round differently), scales within float error,
    and the layer's other rows and pages are untouched."""
    page_size, groups = 16, 4
    pools, stat, table, (b, k, h) = _write_case(kind, page_size, jax.random.key(0))
    keys = jax.random.split(jax.random.key(3), 2)
    lengths = jnp.asarray([page_size, 16, 5, 40], jnp.int32)
    qkv = jax.random.normal(keys[0], (b, k * (groups + 2), h), jnp.float32).astype(jnp.bfloat16)
    angle = jax.random.uniform(keys[1], (b, h // 2), jnp.float32, 0, 100)
    args = (*pools, *stat, table, lengths, qkv, jnp.cos(angle), jnp.sin(angle),
            jnp.asarray([1, 1, 1, 0], jnp.int32), jnp.asarray([True, False]))
    kw = dict(q_rows=query_rows(groups), sink_pages=1, ring_pages=2, stats=True, layer=1)
    ref = append_rotated_reference(*args, **kw)
    out = append_decode(*args, **kw, interpret=INTERPRET)
    for a, c in zip(ref[1:3], out[1:3]):
        phys = jnp.broadcast_to(jnp.arange(1, a.codes.shape[0]), (b, k, a.codes.shape[0] - 1))
        want = np.asarray(kv_quant.read_pages(a, phys, 1))
        got = np.asarray(kv_quant.read_pages(c, phys, 1))
        step = 0.02 if kind in kv_quant.STATIC else np.nanmax(np.asarray(a.scale[:, 0]))
        finite = np.isfinite(want)
        np.testing.assert_array_equal(finite, np.isfinite(got))
        atol = 2 * 0.02 * 2.0 ** -3 * 40 if kind == "fp8" else 1.01 * step
        np.testing.assert_allclose(got[finite], want[finite], atol=atol)
        if kind in kv_quant.PER_TOKEN:  # page 0 is the trash page: the kernel writes there
            np.testing.assert_allclose(np.asarray(c.scale[1:]), np.asarray(a.scale[1:]),
                                       rtol=1e-5, equal_nan=True)
    lower_for_cuda(lambda *a: append_decode(*a, **kw), *args)


@pytest.mark.parametrize("kind", FORMATS)
def test_prefill_write_calibrates_and_matches_the_aligned_write(kind):
    pools, stat, table, (b, k, h) = _write_case(kind, 16, jax.random.key(1))
    if kind in kv_quant.STATIC:
        pools = [dataclasses.replace(x, scale=jnp.full(x.scale.shape, 5.0)) for x in pools]
    t = 40
    new = jax.random.normal(jax.random.key(2), (b, t, k, h), jnp.float32).astype(jnp.bfloat16)
    lengths = jnp.asarray([0, 32, 0, 0], jnp.int32)
    new_lens = jnp.asarray([40, 9, 0, 17], jnp.int32)
    args = (*pools, *stat, table, lengths, new, -new, new_lens, jnp.asarray([True, False]))
    kw = dict(sink_pages=1, ring_pages=2, stats=True, layer=1)
    ref = write_tokens_reference(*args, **kw)
    out = write_tokens(*args, **kw, aligned=True)
    for a, c in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        # compiled for a GPU the two programs may round a code the other way (codes off by
        # one); interpreted on the CPU they agree exactly
        np.testing.assert_allclose(np.asarray(a[1:], np.float32), np.asarray(c[1:], np.float32),
                                   atol=0 if INTERPRET or a.dtype != jnp.uint8 else 1,
                                   rtol=0 if INTERPRET else 1e-6)
    if kind in kv_quant.STATIC:
        scale = np.asarray(ref[0].scale)
        assert (scale[0] == 5.0).all() and (scale[1, 1] == 5.0).all() and (scale[1, 2] == 5.0
                                                                              ).all()
        assert (scale[1, [0, 3]] != 5.0).all(), "rows starting here are calibrated"
    # row 0's keys of KV head 1 read back within half a quantization step (fp8: 2^-4)
    pos = jnp.arange(32)
    phys = table[:, :, pos // 16]  # [B, K, 32]: read_pages takes every (row, head)'s pages
    back = np.asarray(kv_quant.read_pages(ref[0], phys, 1))[0, 1]
    back = back[np.arange(32), np.asarray(pos) % 16]
    want = np.asarray(new[0, :32, 1], np.float32)
    assert np.all(np.abs(back - want) <= _half_step(kind, np.asarray(new[0, :40], np.float32),
                                                    want))


def _half_step(kind, written, x):
    """Half a quantization step of each token of x [T, H] (fp8: 2^-4 of each value), the
    static formats calibrated on all the tokens written [T, K, H]."""
    if kind == "fp8":
        return np.abs(x) / 16 + 1e-3
    if kind == "int8":
        return np.abs(written).max() / 127 / 2 * 1.01 + 1e-6
    levels = 15 if kind == "int4" else 255
    return ((x.max(axis=-1) - x.min(axis=-1)) / levels / 2 * 1.01 + 1e-6)[:, None]
