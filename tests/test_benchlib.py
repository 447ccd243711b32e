"""Benchmark plumbing on the CPU: the measured device facts, floors and where results go."""

import json

import pytest

from experiments import benchlib


def test_the_device_is_measured_once_and_marked_as_a_cpu_probe():
    facts = benchlib.measure_device()
    assert benchlib.measure_device() is facts
    assert facts.bandwidth_bytes_per_s > 0 and facts.matmul_flops_per_s > 0
    assert facts.memory_bytes > 2**30
    assert facts.method.startswith("CPU smoke probe") and "host RAM" in facts.method


def test_the_floor_is_the_slower_of_bandwidth_and_matmul():
    facts = benchlib.DeviceFacts(2e12, 1e15, 80 * 2**30, "test")
    assert facts.floor_ms(bytes_moved=4e9) == pytest.approx(2.0)
    assert facts.floor_ms(bytes_moved=4e9, flops=4e12) == pytest.approx(4.0)
    assert facts.record() == {"measured_bandwidth_gbps": 2000.0, "measured_matmul_tflops": 1000.0,
                              "device_memory_gib": 80.0, "device_facts_method": "test"}


@pytest.mark.parametrize("kind, platform, slug", [
    ("NVIDIA H100 80GB HBM3", "gpu", "h100"), ("NVIDIA H200", "gpu", "h200"),
    ("NVIDIA A100-SXM4-80GB", "gpu", "a100"), ("cpu", "cpu", "cpu"),
    ("TPU v5 lite", "tpu", "tpu-v5-lite"), ("NVIDIA GeForce RTX 4090", "gpu", "geforce-rtx-4090")])
def test_device_folders_are_short_slugs(kind, platform, slug):
    assert benchlib.device_slug(kind, platform) == slug


def test_results_land_in_the_device_folder_with_provenance_and_facts(tmp_path, monkeypatch):
    monkeypatch.setattr(benchlib, "RESULTS", tmp_path)
    facts = benchlib.DeviceFacts(2e12, 1e15, 80 * 2**30, "test")
    path = benchlib.write_results("bench", [{"ms": 1.0}], None, facts, shape="toy")
    assert path == tmp_path / "cpu" / "bench.json"
    result = json.loads(path.read_text())
    for key in ("device", "jax_version", "date", "git_commit", "command",
                "measured_bandwidth_gbps", "measured_matmul_tflops", "device_memory_gib"):
        assert key in result, key
    assert result["shape"] == "toy" and result["rows"] == [{"ms": 1.0}]
    computed = json.loads(benchlib.write_results("costs", [], tmp_path / "x", None).read_text())
    assert "measured_bandwidth_gbps" not in computed and "git_commit" in computed
