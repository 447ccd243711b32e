"""Fused sparse prefill kernel against its plain-jnp reference (interpret mode on CPU,
compiled on a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.sparse_prefill.api import sparse_prefill
from pallas_kernels.sparse_prefill.kernel import PrefillBlocks
from pallas_kernels.sparse_prefill.reference import sparse_prefill_reference
from tests.kernels.conftest import INTERPRET, close

BLOCKS = PrefillBlocks(block_q=16, block_k=16, num_warps=4)


def _case(g, streaming, seed, t=100, kh=2, h=32, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 3)
    b = 3
    q = jax.random.normal(keys[0], (b, t, kh * g, h), jnp.float32).astype(dtype)
    k, v = (jax.random.normal(x, (b, t, kh, h), jnp.float32).astype(dtype) for x in keys[1:])
    lens = jnp.asarray([t, 37, 1], jnp.int32)  # ragged, not tile multiples
    k = jnp.where((jnp.arange(t) < lens[:, None])[..., None, None], k, jnp.nan)  # poison padding
    return q, k, v, lens, lens, jnp.asarray(streaming)


@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("streaming", [(False, False), (True, True), (True, False)],
                         ids=["dense", "streaming", "mixed"])
@pytest.mark.parametrize("sink, local", [(20, 30), (0, 45)])  # not tile multiples
def test_kernel_matches_reference(g, streaming, sink, local):
    args = _case(g, streaming, seed=g * 7 + sink + sum(streaming))
    kw = dict(sink=sink, local=local)
    ref = sparse_prefill_reference(*args, **kw)
    out = sparse_prefill(*args, **kw, blocks=BLOCKS, interpret=INTERPRET)
    close(out, ref, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out[1, 37:]), 0)  # padded rows are zero
    lower_for_cuda(lambda *a: sparse_prefill(*a, **kw), *args)


def test_chunk_queries_see_earlier_keys():
    """The last q_lens of kv_lens keys as queries: what a later prefill chunk computes."""
    q, k, v, lens, _, streaming = _case(4, (True, False), seed=3)
    q_lens = jnp.asarray([30, 17, 1], jnp.int32)
    kw = dict(sink=20, local=30)
    ref = sparse_prefill_reference(q[:, :30], k, v, q_lens, lens, streaming, **kw)
    out = sparse_prefill(q[:, :30], k, v, q_lens, lens, streaming, **kw, blocks=BLOCKS,
                         interpret=INTERPRET)
    close(out, ref, jnp.bfloat16)
