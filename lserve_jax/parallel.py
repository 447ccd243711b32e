"""Tensor and data parallelism through JAX's own sharding: a ('dp', 'tp') device mesh,
parameters and the KV cache declared as `PartitionSpec`s over it.

- **tp** splits each layer Megatron-style: the q/k/v and gate/up projections by output heads /
  hidden columns, the o and down projections by rows (XLA inserts one all-reduce after each),
  the embedding and LM head by vocabulary rows (`ParallelConfig.shard_vocab`) or whole on every
  device. The KV cache splits by KV head: each device holds the pages, statistics, page tables
  and selections of its own heads, and attention (every Pallas kernel) runs per device under
  `shard_map` (`PagedAttention.mesh`), so no KV byte ever crosses devices.
- **dp** splits the slots: replica r serves slots [r B/dp, (r + 1) B/dp) from its own pages.

The pool's page axis is split over (dp, tp): device (r, t) holds pages [s P/D, (s + 1) P/D) with
s = r tp + t and D = dp tp, and page tables hold page ids local to the device (0: its trash
page), handed out by one host-side allocator with a free list per device
(`cache.allocator.PageAllocator(shards=D)`). One device (1 x 1) uses no mesh at all.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lserve_jax.config import ModelConfig, ParallelConfig
from lserve_jax.model.quant import LINEAR
from pallas_kernels.layout import STREAM

DP, TP = "dp", "tp"
PAGES = P((DP, TP))  # the pool's page axis (and the statistics'), one block per device
# parameter name -> the axis split over tp, in the weight's bf16 layout [in..., out...]
_SPLIT_AXIS = {"qkv": 1, "o": 0, "gate_up": 2, "down": 0, "lm_head": 1, "embed": 0}
_VOCAB = ("embed", "lm_head")


def make_mesh(parallel: ParallelConfig) -> Mesh | None:
    """The ('dp', 'tp') mesh over the first dp * tp devices; None for one device."""
    if parallel.devices == 1:
        return None
    have = jax.device_count()
    if have < parallel.devices:
        raise ValueError(f"ParallelConfig(tp={parallel.tp}, dp={parallel.dp}) needs "
                         f"{parallel.devices} devices and jax sees {have}: lower tp or dp (on "
                         "a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)")
    devices = np.asarray(jax.devices()[: parallel.devices]).reshape(parallel.dp, parallel.tp)
    return Mesh(devices, (DP, TP))


def qkv_order(model: ModelConfig, tp: int) -> np.ndarray:
    """[N + 2K] the fused q/k/v heads in device order: device t's block is its own q heads,
    k heads and v heads, so that a contiguous split of the fused axis gives each device the
    layout one device uses (its query heads are those of its KV heads' groups)."""
    n, k = model.n_heads, model.n_kv_heads
    blocks = [np.arange(n).reshape(tp, n // tp), n + np.arange(k).reshape(tp, k // tp),
              n + k + np.arange(k).reshape(tp, k // tp)]
    return np.concatenate(blocks, axis=1).reshape(-1)


def param_spec(name: str, ndim: int, fp8: bool, parallel: ParallelConfig) -> P:
    """The PartitionSpec of parameter `name` (an FP8 weight is stored [out..., in...], its
    `<name>_scale` [out...]; `lserve_jax.model.quant`)."""
    base = name.removesuffix("_scale")
    if base not in _SPLIT_AXIS or (base in _VOCAB and not parallel.shard_vocab):
        return P()
    axis = _SPLIT_AXIS[base]
    if fp8 and base in LINEAR:
        n_in = LINEAR[base]
        if axis >= n_in:  # an output axis: first in the codes and in the scale
            axis -= n_in
        elif name == base:  # a contracted axis: last in the codes ...
            axis += ndim - n_in
        else:  # ... and absent from the scale
            return P()
    return P(*([None] * axis), TP)


def shard_params(params: dict, model: ModelConfig, mesh: Mesh,
                 parallel: ParallelConfig) -> dict:
    """The parameters placed over `mesh`, the fused q/k/v heads put in device order
    (`qkv_order`): they run only as this engine's parameters."""
    fp8 = model.weight_dtype == "fp8"
    order = qkv_order(model, parallel.tp)

    def place(path, leaf):
        name = path[-1].key
        if name.removesuffix("_scale") == "qkv":
            leaf = np.take(np.asarray(leaf), order, axis=0 if fp8 else 1)
        spec = param_spec(name, np.ndim(leaf), fp8, parallel)
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree.map_with_path(place, params)


def shardings(specs, mesh: Mesh):
    """`NamedSharding`s over `mesh` of a pytree of PartitionSpecs (e.g. `cache_specs`)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, P))


def device_stream_heads(modes: np.ndarray, tp: int) -> tuple[tuple[int, ...] | None, ...]:
    """Each layer's streaming KV heads as one device sees them (local indices), for the
    prefill paths that split heads by mode in Python: None where a layer's tp devices hold
    different sets (its prefill then runs the fused kernel, which reads the modes as data)."""
    heads = modes.shape[1] // tp
    out = []
    for row in np.asarray(modes):
        sets = {tuple(int(h) for h in np.nonzero(row[t * heads:(t + 1) * heads] == STREAM)[0])
                for t in range(tp)}
        out.append(sets.pop() if len(sets) == 1 else None)
    return tuple(out)
