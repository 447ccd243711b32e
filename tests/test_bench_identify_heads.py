"""The gate-training benchmark: a toy run on the CPU records time, memory and provenance."""

import json
import pathlib

from experiments import bench_identify_heads

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf_tiny_llama"  # loads faster than tiny


def test_a_toy_run_on_the_cpu_records_time_and_memory(tmp_path):
    bench_identify_heads.main(["--model", str(FIXTURE), "--length", "128", "--warmup", "1",
                               "--steps", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "identify_heads.json").read_text())
    (row,) = result["rows"]
    assert row["length"] == 128 and row["batch"] == 1 and row["s_per_step"] > 0
    assert row["temp_bytes"] > 0 and row["peak_bytes_in_use"] is None  # the CPU reports none
    assert result["device"] == "cpu" and result["git_commit"] and result["config"]["remat"]
    assert result["weight_bytes"] > 0
