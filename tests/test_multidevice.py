"""Runs tests/multidevice (tensor and data parallel on 8 virtual CPU devices) in processes of
their own: the device count is fixed when jax starts. One process per policy's equivalence
tests and one for the sharded program, so that the two CI workers share them (the root
conftest starts them first)."""

import os
import pathlib
import subprocess
import sys

import pytest

from lserve_jax.config import POLICIES

ROOT = pathlib.Path(__file__).parent.parent
SUITES = [("test_tensor_parallel.py", policy) for policy in POLICIES] + [
    ("test_sharded_program.py", None)]


@pytest.mark.parametrize("module,policy", SUITES, ids=[p or m for m, p in SUITES])
def test_multidevice(module, policy):
    env = dict(os.environ, LSERVE_MULTIDEVICE="1", JAX_PLATFORMS="cpu")
    select = ["-k", policy] if policy else []
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"tests/multidevice/{module}", *select], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
