"""Runs tests/multidevice (tensor and data parallel on 8 virtual CPU devices) in a process of
its own: the device count is fixed when jax starts."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "tests/multidevice").glob(
    "test_*.py")))
def test_multidevice(module):
    env = dict(os.environ, LSERVE_MULTIDEVICE="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"tests/multidevice/{module}"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
