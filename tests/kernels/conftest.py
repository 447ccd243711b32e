"""Shared pieces of the kernel tests: random paged pools poisoned with NaN."""

import jax
import jax.numpy as jnp
import numpy as np

# Compiled Triton on a GPU, Pallas interpret mode everywhere else (CI): the same tests.
INTERPRET = jax.default_backend() != "gpu"

# kernel vs f32 reference, max |out - ref| / max(1, max |ref|)
KERNEL_TOLERANCE = {
    # bf16 inputs; the kernel rounds probabilities to bf16 before p @ V (as flash kernels do)
    # and the output to bf16: about 2^-8 relative, plus accumulation order.
    "bfloat16": 2e-2,
    # f32 inputs: Triton's f32 dots may use TF32 on the GPU (~2^-11); interpret mode is exact.
    "float32": 2e-3,
}


def nan_pool(p, page_size, h, dtype, key, rows=None):
    """A [P, Np, H] pool of random values with page 0 and every 5th page set to NaN."""
    shape = (p, page_size if rows is None else rows, h)
    pool = jax.random.normal(key, shape, jnp.float32).astype(dtype)
    poison = (np.arange(p) % 5 == 0)[:, None, None]
    return jnp.where(poison, jnp.nan, pool)


def random_tables(b, k, m, p, key):
    """[B, K, M] distinct physical pages drawn from the non-poisoned ones, in random order."""
    good = np.nonzero(np.arange(p) % 5 != 0)[0]
    assert good.size >= b * k * m, "pool too small for the tables"
    order = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30))).permutation(good)
    return jnp.asarray(order[: b * k * m].reshape(b, k, m), jnp.int32)


def close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "NaN/inf leaked into the output"
    err = np.abs(out - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= KERNEL_TOLERANCE[str(jnp.dtype(dtype))], f"max error {err}"
