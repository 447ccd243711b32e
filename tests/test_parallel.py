"""The mesh layout's pure parts (one device suffices): fused q/k/v heads in device order, the
split axis of every parameter (bf16 and FP8 layouts), and the streaming heads a device sees.
The sharded engine itself runs in tests/multidevice."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lserve_jax.config import ModelConfig, ParallelConfig
from lserve_jax.parallel import device_stream_heads, param_spec, qkv_order
from pallas_kernels.layout import DENSE, SELECT, STREAM


def test_qkv_order_gives_each_device_its_own_q_k_v_heads():
    cfg = ModelConfig(n_heads=8, n_kv_heads=4)  # G = 2; fused axis: q 0-7, k 8-11, v 12-15
    order = qkv_order(cfg, 2)
    assert order.tolist() == [0, 1, 2, 3, 8, 9, 12, 13, 4, 5, 6, 7, 10, 11, 14, 15]
    assert qkv_order(cfg, 1).tolist() == list(range(16))
    for block in order.reshape(2, -1):
        q, k = block[:4], block[4:6] - 8
        assert (q // cfg.group_size).tolist() == np.repeat(k, 2).tolist()  # q heads of its k


@pytest.mark.parametrize("name,ndim,fp8,spec", [
    ("qkv", 3, False, P(None, "tp")), ("o", 3, False, P("tp")),
    ("gate_up", 3, False, P(None, None, "tp")), ("down", 2, False, P("tp")),
    ("lm_head", 2, False, P(None, "tp")), ("embed", 2, False, P("tp")),
    ("weight", 1, False, P()),
    # FP8: codes [out..., in...], scales [out...]
    ("qkv", 3, True, P("tp")), ("qkv_scale", 2, True, P("tp")),
    ("o", 3, True, P(None, "tp")), ("o_scale", 1, True, P()),
    ("gate_up", 3, True, P(None, "tp")), ("gate_up_scale", 2, True, P(None, "tp")),
    ("down", 2, True, P(None, "tp")), ("down_scale", 1, True, P()),
    ("lm_head", 2, True, P("tp")), ("lm_head_scale", 1, True, P("tp")),
])
def test_megatron_split_of_each_parameter(name, ndim, fp8, spec):
    assert param_spec(name, ndim, fp8, ParallelConfig(tp=2)) == spec


def test_replicated_vocabulary():
    whole = ParallelConfig(tp=2, shard_vocab=False)
    assert param_spec("embed", 2, False, whole) == param_spec("lm_head", 2, False, whole) == P()


def test_streaming_heads_per_device_or_none_where_devices_differ():
    modes = np.array([[STREAM, DENSE, STREAM, DENSE],  # device 0 and 1 both stream local 0
                      [STREAM, STREAM, DENSE, SELECT],  # device 0 streams both, device 1 none
                      [DENSE, DENSE, DENSE, DENSE]])
    assert device_stream_heads(modes, 2) == ((0,), None, ())
    assert device_stream_heads(modes, 1) == ((0, 2), (0, 1), ())
