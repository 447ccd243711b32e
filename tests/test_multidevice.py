"""Runs tests/multidevice (tensor and data parallel on 8 virtual CPU devices) in processes of
their own: the device count is fixed when jax starts. Three processes (the policies'
equivalence tests in two halves, the sharded program) of about a minute each, so that the two
CI workers share them (the root conftest starts them first)."""

import os
import pathlib
import subprocess
import sys

import pytest

from lserve_jax.config import POLICIES

ROOT = pathlib.Path(__file__).parent.parent
HALF = ("dense", "streaming", "quest")  # by compilation time, about half the cases
SUITES = {"policies_a": ("test_tensor_parallel.py", HALF),
          "policies_b": ("test_tensor_parallel.py", tuple(p for p in POLICIES if p not in HALF)),
          "sharded_program": ("test_sharded_program.py", ())}


@pytest.mark.parametrize("suite", SUITES)
def test_multidevice(suite):
    module, policies = SUITES[suite]
    env = dict(os.environ, LSERVE_MULTIDEVICE="1", JAX_PLATFORMS="cpu")
    select = ["-k", " or ".join(policies)] if policies else []
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"tests/multidevice/{module}", *select], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
