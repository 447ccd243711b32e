"""The one seam between the model and the kernels.

`PagedAttention` (serving: the paged cache, every policy, every backend) is what the model
calls; `backends` maps each `Backend` to its kernels. Anything with the same `attend` / `norm`
/ `finish` methods can stand in for it (the lab's training attention does).
"""

from lserve_jax.attention.backends import KernelTuning, Kernels, kernels
from lserve_jax.attention.paged import (AttentionImpl, AttentionMetadata, PagedAttention, Phase,
                                        example_inputs, rope_tables, split_heads)

__all__ = ["AttentionImpl", "AttentionMetadata", "KernelTuning", "Kernels", "PagedAttention",
           "Phase", "example_inputs", "kernels", "rope_tables", "split_heads"]
