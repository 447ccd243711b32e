"""LServe in JAX and Pallas: unified sparse attention for long-sequence LLM serving.

    from lserve_jax import LLM, SamplingParams
"""

from typing import TYPE_CHECKING

__all__ = ["LLM", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from lserve_jax.engine import RequestOutput
    from lserve_jax.llm import LLM
    from lserve_jax.sampling import SamplingParams


def __getattr__(name: str):
    """The API loads on first use, so `import lserve_jax.config` stays light."""
    if name == "LLM":
        from lserve_jax.llm import LLM
        return LLM
    if name == "RequestOutput":
        from lserve_jax.engine import RequestOutput
        return RequestOutput
    if name == "SamplingParams":
        from lserve_jax.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'lserve_jax' has no attribute {name!r}")
