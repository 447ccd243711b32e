"""Fused residual add + RMSNorm kernel (interpret mode on the CPU) against its jnp reference."""

import functools

import jax
import numpy as np
import pytest

from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.rms_norm.api import add_rms_norm
from pallas_kernels.rms_norm.reference import add_rms_norm_reference
from tests.kernels.conftest import INTERPRET

EPS = 1e-5


def _inputs(shape, dtype, seed):
    kx, kd, kw = jax.random.split(jax.random.key(seed), 3)
    x = (4 * jax.random.normal(kx, shape)).astype(dtype)
    delta = jax.random.normal(kd, shape).astype(dtype)
    weight = (1 + 0.2 * jax.random.normal(kw, shape[-1:])).astype(dtype)
    return x, delta, weight


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 1, 256), (2, 5, 4096)])
@pytest.mark.parametrize("add", [True, False])
def test_kernel_matches_reference(dtype, shape, add):
    x, delta, weight = _inputs(shape, dtype, seed=len(shape) * shape[-1] + add)
    delta = delta if add else None
    s, out = add_rms_norm(x, delta, weight, eps=EPS, interpret=INTERPRET)
    ref_s, ref_out = add_rms_norm_reference(x, delta, weight, eps=EPS)
    assert s.dtype == ref_s.dtype and out.dtype == ref_out.dtype and out.shape == shape
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(ref_s, np.float32))
    # the mean square is summed in another order: at most one rounding step of the output
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -20
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               rtol=ulp, atol=1e-6)
    again = add_rms_norm(x, delta, weight, eps=EPS, interpret=INTERPRET)[1]
    np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(out, np.float32))
    text = lower_for_cuda(lambda *a: add_rms_norm(*a, eps=EPS), x, delta, weight)
    assert 'name = "add_rms_norm"' in text


def test_width_that_is_not_a_power_of_two_runs_the_reference():
    """Compared with the reference jitted as the entry is (XLA on the GPU fuses it)."""
    x, delta, weight = _inputs((2, 1, 96), "bfloat16", seed=3)
    got = add_rms_norm(x, delta, weight, eps=EPS, interpret=INTERPRET)
    want = jax.jit(functools.partial(add_rms_norm_reference, eps=EPS))(x, delta, weight)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert "triton" not in lower_for_cuda(lambda *a: add_rms_norm(*a, eps=EPS), x, delta,
                                          weight)


def test_mismatched_shapes_name_the_argument():
    x, delta, weight = _inputs((2, 1, 64), "float32", seed=4)
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm(x, delta[:1], weight, eps=EPS, interpret=INTERPRET)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, delta, weight[:32], eps=EPS, interpret=INTERPRET)
