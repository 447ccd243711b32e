"""Tests on 8 virtual CPU devices (tensor and data parallel). The device count is fixed when
jax starts, so `tests/test_multidevice.py` runs this folder in a process of its own; by hand:
`LSERVE_MULTIDEVICE=1 python -m pytest tests/multidevice`."""

import os

# 8 devices; the CPU backend's cheapest code generation (these programs are compiled dozens
# of times and run briefly: a third less CPU time)
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]).strip()

import jax  # noqa: E402


def pytest_configure(config):
    if jax.device_count() < 8:
        raise RuntimeError(f"tests/multidevice needs 8 devices and jax sees {jax.device_count()}:"
                           " run it in a fresh process (LSERVE_MULTIDEVICE=1 python -m pytest "
                           "tests/multidevice), before anything else starts jax")
