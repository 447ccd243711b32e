"""Things every kernel shares: the one place that silences Pallas Triton's deprecation
warning, block-size checks, whole-array blocks, and an abstract H200 for lowering kernels on a
machine without one.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

# Pallas' Triton lowering is deprecated upstream in favour of Mosaic GPU; we pin jax 0.11.2 and
# keep every kernel behind its op's wrapper so that a port touches only pallas_kernels/<op>/.
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

NEG_INF = -1e30  # finite "minus infinity" for running maxima (exp2 of differences stays 0)
LOG2_E = math.log2(math.e)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def check_power_of_two(owner: str, **values: int) -> None:
    """Triton tiles must be powers of two; reject anything else up front."""
    for name, value in values.items():
        if not is_power_of_two(value):
            raise ValueError(f"{owner}.{name}={value} must be a power of two (Triton tiles)")


def whole(x) -> pl.BlockSpec:
    """Every program sees all of `x` (an array or a shape; a pointer to it: nothing is copied);
    kernels index it themselves, e.g. by a `layer_operand` so that one compiled kernel serves
    every layer."""
    shape = tuple(getattr(x, "shape", x))
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def layer_operand(layer: int) -> jax.Array:
    """The layer as a [1] int32 kernel input rather than a static argument: a static layer in
    a block index map makes a different Triton kernel (and GPU compile) for every layer."""
    return jnp.full((1,), layer, jnp.int32)


def abstract_gpu_mesh(shape: tuple[int, ...] = (1,), names: tuple[str, ...] = ("x",),
                      device_kind: str = "NVIDIA H200", num_cores: int = 132,
                      axis_type: AxisType = AxisType.Explicit) -> AbstractMesh:
    """A mesh of GPUs that need not exist (for lowering on a machine without them)."""
    return AbstractMesh(shape, names, (axis_type,) * len(shape), abstract_device=AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform="gpu"))


@contextlib.contextmanager
def abstract_gpu(mesh: AbstractMesh | None = None):
    """Lets `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` lower Pallas Triton
    kernels on a machine without a GPU (CI), so lowering errors surface there; `mesh`: several
    GPUs (`abstract_gpu_mesh`), for programs that shard over them."""
    with use_abstract_mesh(mesh or abstract_gpu_mesh()):
        yield


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of `fn(*args)` lowered for CUDA (Triton kernels included)."""
    with abstract_gpu():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
