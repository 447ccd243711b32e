import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.attention import AttentionMetadata, PagedAttention, Phase
from lserve_jax.config import ModelConfig, RopeScaling, SparsityConfig
from lserve_jax.model.llama import Llama, init_params, rope_inv_freq
from lserve_jax.sparsity.policy import head_modes
from tests.conftest import TOLERANCE
from tests.helpers import allocated_cache

DENSE = SparsityConfig(policy="dense", page_size=8, logical_page_size=4)


@functools.cache
def _jitted(model):
    return jax.jit(model.apply)


def _forward(model, params, tokens, positions, cache, new_lens, modes, phase, step=0):
    meta = AttentionMetadata(new_lens=jnp.asarray(new_lens, jnp.int32), modes=modes,
                             step=jnp.int32(step), phase=phase)
    return _jitted(model)({"params": params}, tokens, positions, cache, meta)


@pytest.mark.parametrize("dtype, tie, backend", [
    ("float32", False, "reference"), ("float32", True, "reference"),
    ("bfloat16", False, "reference"), ("bfloat16", True, "reference"),
    # the decode kernels (RoPE fused into the KV append), interpreted, against the reference
    # full forward
    ("float32", True, "pallas_interpret"), ("bfloat16", False, "pallas_interpret")])
def test_incremental_decode_equals_full_forward(dtype, tie, backend):
    cfg = ModelConfig(dtype=dtype, tie_embeddings=tie, rope_scaling=RopeScaling(
        original_max_position=16), rope_theta=5000.0)
    params = init_params(cfg, jax.random.key(1))
    model = Llama(cfg, PagedAttention(DENSE))
    stepper = Llama(cfg, PagedAttention(DENSE, backend))
    modes = jnp.asarray(head_modes(cfg, DENSE))
    lens = np.array([21, 13, 1])
    t = 21
    tokens = jax.random.randint(jax.random.key(2), (3, t), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(t), (3, t))
    cache, _ = allocated_cache(cfg, DENSE, [32, 32, 32], np.asarray(modes))
    full, _ = _forward(model, params, tokens, positions, cache, lens, modes, Phase.PREFILL)
    # prefill the first 5 tokens (fewer where the row is shorter), then decode one at a time
    first = np.minimum(lens, 5)
    steps, c = [], cache
    out, c = _forward(model, params, tokens[:, :5], positions[:, :5], c, first, modes,
                      Phase.PREFILL)
    steps.append(out)
    for i in range(5, t):
        active = (i < lens).astype(np.int32)
        out, c = _forward(stepper, params, tokens[:, i:i + 1], positions[:, i:i + 1], c,
                          active, modes, Phase.DECODE, i - 5)
        steps.append(out)
    inc = np.asarray(jnp.concatenate(steps, axis=1))
    full = np.asarray(full)
    tol = TOLERANCE[dtype] * max(1.0, np.abs(full).max())
    for row, n in enumerate(lens):
        assert np.isfinite(inc[row, :n]).all()
        np.testing.assert_allclose(inc[row, :n], full[row, :n], atol=tol, rtol=0)
    np.testing.assert_array_equal(np.asarray(c.lengths), lens)


def test_ragged_batch_equals_rows_alone():
    cfg = ModelConfig()
    params = init_params(cfg, jax.random.key(3))
    model = Llama(cfg, PagedAttention(DENSE))
    modes = jnp.asarray(head_modes(cfg, DENSE))
    lens = [17, 4, 9]
    tokens = jax.random.randint(jax.random.key(4), (3, 24), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(24), (3, 24))
    cache, _ = allocated_cache(cfg, DENSE, [24, 24, 24], np.asarray(modes))
    batch, _ = _forward(model, params, tokens, positions, cache, lens, modes, Phase.PREFILL)
    for row, n in enumerate(lens):
        alone_cache, _ = allocated_cache(cfg, DENSE, [24], np.asarray(modes), seed=row + 5)
        alone, _ = _forward(model, params, tokens[row:row + 1, :n], positions[:1, :n],
                            alone_cache, [n], modes, Phase.PREFILL)
        np.testing.assert_allclose(np.asarray(batch[row, :n]), np.asarray(alone[0]),
                                   atol=TOLERANCE["float32"], rtol=0)


def test_llama3_rope_scaling_keeps_high_and_scales_low_frequencies():
    cfg = ModelConfig(head_dim=64, rope_theta=500000.0, rope_scaling=RopeScaling())
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    np.testing.assert_array_equal(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8.0)
