"""The serving engine: continuous batching over the paged cache (`Engine`), its scheduler and
jitted steps, and what requests return."""

from lserve_jax.engine.core import Engine, EngineStats
from lserve_jax.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["CompletionOutput", "Engine", "EngineStats", "RequestMetrics", "RequestOutput"]
