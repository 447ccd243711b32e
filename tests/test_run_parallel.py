"""The GPU path's parallel ablation runner (experiments/run_parallel.py) and the merge of a
config's parts (experiments/merge_ablations.py), on the CPU with the random-weight tiny model."""

import dataclasses
import json
import pathlib
import sys
import time

import pytest

from lserve_jax.config import load_experiment
from lserve_jax.eval.ablation import run_accuracy, write_accuracy

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "experiments"))
import merge_ablations  # noqa: E402
import run_parallel  # noqa: E402

TOML = """name = "split"
task = "accuracy"
model = "tiny"
output_dir = "{out}"
policies = ["dense", "lserve"]
contexts = [256, 320]
tasks = ["passkey"]
depths = [0.0, 1.0]
samples = 1

[sparsity]
page_size = 32
logical_page_size = 16
token_budget = 64
prefill_sink = 16
prefill_local = 64
decode_sink = 16
decode_local = 32
"""


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The config, its rows from one process, and one part JSON per context."""
    tmp = tmp_path_factory.mktemp("split")
    config = tmp / "split.toml"
    config.write_text(TOML.format(out=tmp / "merged"))
    exp = load_experiment(config)
    rows = run_accuracy(exp)
    parts = []
    for context in exp.contexts:
        part = dataclasses.replace(exp, contexts=(context,))
        mine = [r for r in rows if r["context"] == context]
        parts.append(json.loads(write_accuracy(part, mine, tmp / f"part{context}")[0].read_text()))
    return config, exp, rows, parts


def test_merged_parts_equal_one_process(split, tmp_path):
    _, exp, rows, parts = split
    merged = merge_ablations.merge(exp, parts[::-1], "two processes", tmp_path)
    whole = write_accuracy(exp, rows, tmp_path / "whole")
    record = json.loads(merged[0].read_text())
    assert record["rows"] == rows
    assert record["merged_from"] == "two processes" and record["date"] == parts[0]["date"]
    assert record["config"]["contexts"] == [256, 320]
    assert merged[1].read_text() == whole[1].read_text()  # the markdown table


def test_merge_refuses_a_cell_twice_and_other_configs(split, tmp_path):
    _, exp, _, parts = split
    with pytest.raises(ValueError, match="same cell"):
        merge_ablations.merge(exp, [parts[0], parts[0]], "", tmp_path)
    with pytest.raises(ValueError, match="the model differs"):
        merge_ablations.merge(dataclasses.replace(exp, model="testbed"), parts, "", tmp_path)


def test_plan_gives_each_context_its_share(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(TOML.format(out=tmp_path).replace("[256, 320]", "[256, 4096, 8192]"))
    parts = run_parallel.plan([str(config)], {8192: 0.3, 4096: 0.1}, tmp_path)
    assert [(p.contexts, p.memory) for p in parts] == [((8192,), 0.3), ((256, 4096), 0.1)]
    assert [p.out for p in parts] == [tmp_path / "split_8192", tmp_path / "split_below8192"]
    one = tmp_path / "one.toml"
    one.write_text(TOML.format(out=tmp_path).replace("[256, 320]", "[2048]"))
    assert [p.contexts for p in run_parallel.plan([str(one)], {4096: 0.1}, tmp_path)] == [(2048,)]
    with pytest.raises(ValueError, match="add --memory 8192="):
        run_parallel.plan([str(config)], {4096: 0.1}, tmp_path)
    with pytest.raises(ValueError, match="share a name"):
        run_parallel.plan([str(config), str(config)], {8192: 0.3}, tmp_path)


def _sleeper(seconds):
    return lambda part: [sys.executable, "-c", f"import time; time.sleep({seconds})"]


def test_run_keeps_within_the_memory_budget(tmp_path):
    parts = [run_parallel.Part("c", "c", (n,), 0.5, tmp_path / f"c_{n}") for n in range(3)]
    start = time.time()
    status = run_parallel.run(parts, budget=1.0, procs=8, seconds=60, command=_sleeper(1))
    assert status == {str(p.out): 0 for p in parts}
    assert time.time() - start >= 2.0  # two at a time: three parts take two rounds
    with pytest.raises(ValueError, match="more than the budget"):
        run_parallel.run(parts, budget=0.4, procs=8, seconds=60, command=_sleeper(0))


def test_run_cuts_off_at_the_deadline_and_leaves_the_config_unmerged(tmp_path):
    parts = [run_parallel.Part("c", "c", (1,), 0.5, tmp_path / "c_1")]
    status = run_parallel.run(parts, budget=1.0, procs=8, seconds=1.5, command=_sleeper(30))
    assert status == {str(parts[0].out): 124}
    assert run_parallel.merge_configs(parts, status, "") == ["c"]


def test_main_runs_and_merges_a_config(split, tmp_path, monkeypatch):
    config, exp, rows, _ = split
    monkeypatch.setattr(sys, "argv", ["run_parallel.py", str(config), "--memory", "512=0.5",
                                      "--work", str(tmp_path / "work")])
    run_parallel.main()
    record = json.loads((pathlib.Path(exp.output_dir) / "split.json").read_text())
    assert record["rows"] == rows  # the parts' processes decode as this one did
    assert "run_parallel.py" in record["merged_from"]
    assert sorted(p.name for p in (tmp_path / "work").glob("*.log")) == [
        "split_320.log", "split_below320.log"]


def test_memory_flags_are_checked(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run_parallel.py", "x.toml", "--memory", "8192:0.3"])
    with pytest.raises(SystemExit, match="CONTEXT=FRACTION"):
        run_parallel.main()


def test_an_unknown_config_field_still_fails_before_any_process(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(TOML.format(out=tmp_path).replace("samples = 1", "sampels = 1"))
    with pytest.raises(ValueError, match="sampels"):
        run_parallel.plan([str(config)], {512: 0.5}, tmp_path)

