"""Shared test settings: CPU only, tolerances keyed by dtype (with reasons), small shapes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # set JAX_PLATFORMS=cuda to run on a GPU

import jax  # noqa: E402
import pytest  # noqa: E402

# tests/multidevice needs 8 virtual devices, fixed when jax starts: test_multidevice.py runs it
# in a process of its own
collect_ignore = [] if os.environ.get("LSERVE_MULTIDEVICE") == "1" else ["multidevice"]


def pytest_collection_modifyitems(items):
    """The multi-device suites (minutes each, in processes of their own) first, so that the
    other tests fill the workers around them instead of waiting behind them at the end."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_multidevice.py"))

# max |a - b| / max(1, |ref|) between two computations of the same function.
TOLERANCE = {
    # f32 end to end: differences come from summation order only (XLA CPU dots, softmax).
    "float32": 2e-5,
    # bf16 activations/weights: one bf16 rounding (2^-8) amplified through a few matmuls.
    "bfloat16": 3e-2,
}


@pytest.fixture(autouse=True, scope="session")
def _cpu_defaults():
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
