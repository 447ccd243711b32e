"""The serving benchmark at toy size on the CPU: both schedules and an online rate run, the
results file holds what the plot needs, and the request mix is seeded."""

import json

import numpy as np

from experiments import bench_serving, plot_results


def test_toy_mix_runs_both_schedules_offline_and_online(tmp_path):
    rows = bench_serving.main([
        "--mix", "toy", "--model", "tiny", "--backend", "reference", "--policies", "dense",
        "--chunk", "64", "--slots", "3", "--decode-steps", "4", "--pool-pages", "200",
        "--rates", "inf", "50", "--out", str(tmp_path)])
    assert [(r["schedule"], r["rate"]) for r in rows] == [
        ("continuous", "inf"), ("continuous", 50.0), ("wave", "inf"), ("wave", 50.0)]
    mix = bench_serving.requests(bench_serving.MIXES["toy"], 512, seed=0)
    for row in rows:  # every request generated exactly its output length (no stop token)
        assert row["output_tokens"] == sum(n for _, n in mix) and row["requests"] == len(mix)
        assert 0 < row["peak_pages"] <= row["pool_pages"] == 199
        assert row["ttft_ms_p50"] <= row["ttft_ms_p99"]
    continuous, wave = rows[0], rows[2]
    assert continuous["mean_decoding_slots"] >= wave["mean_decoding_slots"] * 0.99 or (
        continuous["iterations"] < wave["iterations"])
    data = json.loads((tmp_path / "serving_toy.json").read_text())
    assert data["mix"]["requests"] == 6 and data["git_commit"] and data["command"]
    plot_results.plot_serving(data, tmp_path / "serving_toy.png")
    assert (tmp_path / "serving_toy.png").stat().st_size > 0


def test_mixes_are_seeded_and_within_their_ranges():
    mix = bench_serving.MIXES["A"]
    a = bench_serving.requests(mix, 128256, seed=0, scale=1 / 64)
    assert a == bench_serving.requests(mix, 128256, seed=0, scale=1 / 64)
    assert a != bench_serving.requests(mix, 128256, seed=1, scale=1 / 64)
    assert all(128 <= len(p) <= 1024 and 16 <= n <= 64 for p, n in a)
    at = bench_serving.arrivals(1000, 4.0, seed=0)
    assert np.all(np.diff(at) > 0) and abs(at[-1] / 1000 - 0.25) < 0.03  # Poisson, 4 per s
    assert not bench_serving.arrivals(5, float("inf"), seed=0).any()
