"""Pallas GPU kernels for LServe-style sparse attention. Imports jax only, never lserve_jax.

One folder per op: `kernel.py` (Pallas, Triton lowering), `reference.py` (plain jnp, the oracle),
and the op's public wrapper. The Triton-lowering deprecation warning is silenced in `_compat`.
"""
