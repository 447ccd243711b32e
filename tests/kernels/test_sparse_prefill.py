"""Fused sparse prefill kernel against its plain-jnp reference (interpret mode on CPU,
compiled on a GPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.attention import backends as attention
from lserve_jax.config import SparsityConfig
from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.sparse_prefill.api import sparse_prefill
from pallas_kernels.sparse_prefill.kernel import PrefillBlocks
from pallas_kernels.sparse_prefill.reference import sparse_prefill_reference
from pallas_kernels.sparse_prefill.windowed import windowed_prefill
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


@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("sink, local", [(20, 30), (0, 45), (24, 8), (16, 150)],
                         ids=["sink-window", "window-only", "sink-past-window", "window-past-t"])
def test_windowed_prefill_matches_reference(g, sink, local):
    """cuDNN's sliding window + the sink call, merged by log-sum-exp (plain jnp off the GPU)."""
    q, k, v, lens, _, _ = _case(g, (True, True), seed=g * 5 + sink + local)
    streaming = jnp.ones((2,), bool)
    ref = sparse_prefill_reference(q, k, v, lens, lens, streaming, sink=sink, local=local)
    out = windowed_prefill(q, k, v, lens, sink=sink, local=local,
                           implementation="xla" if INTERPRET else "cudnn")
    close(out, ref, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out[1, 37:]), 0)


def test_windowed_merge_weighs_the_parts_in_f32():
    """Queries 60-63 score one sink key and their own key alike, high (logits ~34): the merge
    must weigh the two parts by f32 log-sum-exps. A bf16 statistic (spacing 0.25 at 34) puts
    the error at ~1.1e-2 on this case; f32 at ~5e-3 (bf16 output and probabilities)."""
    q, k, v, lens, _, _ = _case(4, (True, True), seed=11)
    for s in range(4):
        k = k.at[:, s].set(q[:, 60 + s, ::4] * 6).at[:, 60 + s].set(q[:, 60 + s, ::4] * 6)
    kw = dict(sink=4, local=8)
    ref = sparse_prefill_reference(q, k, v, lens, lens, jnp.ones((2,), bool), **kw)
    out = windowed_prefill(q, k, v, lens, **kw, implementation="xla" if INTERPRET else "cudnn")
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 8e-3


def test_composite_prefill_puts_each_head_group_back_in_place(monkeypatch):
    """The composite path gathers the retrieval and the streaming heads, runs each group through
    its own attention and puts the outputs back in head order. Off the GPU both groups run the
    plain-jnp twins of their cuDNN calls."""
    def xla_causal(q, k, v, lens):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lens,
                                            key_value_seq_lengths=lens, implementation="xla")

    if INTERPRET:
        monkeypatch.setattr(attention, "cudnn_causal", xla_causal)
        monkeypatch.setattr(attention, "windowed_prefill", functools.partial(
            windowed_prefill, implementation="xla"))
    q, k, v, lens, _, _ = _case(4, (True, False), seed=17, kh=4)
    streaming = jnp.asarray([True, False, False, True])
    sparsity = SparsityConfig(prefill_sink=16, prefill_local=32)
    ref = sparse_prefill_reference(q, k, v, lens, lens, streaming, sink=16, local=32)
    out = attention.composite_prefill(q, k, v, lens, (0, 3), sparsity, windowed=True)
    close(out, ref, jnp.bfloat16)
