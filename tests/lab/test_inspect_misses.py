"""experiments/inspect_misses.py: locating answers in the prompt, and a run on the testbed."""

import pathlib
import sys

import pytest

from lserve_jax.lab.tasks import END, VALUE_LEN, make_sample

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "experiments"))
import inspect_misses  # noqa: E402

CONFIGS = pathlib.Path(__file__).parents[2] / "experiments" / "configs"


def test_a_wrong_tracking_answer_is_traced_to_the_distractor_it_copies():
    sample = make_sample("vartrack", 1024, 0.25, seed=7)
    facts = inspect_misses.facts(sample.prompt)
    assert len(facts) == 4  # x1's value, the hop x2 -> x1, two distractors
    assert sample.needle_at in [pos for pos, _ in facts]
    (pos, value), *_ = [(p, v) for p, v in facts if p != sample.needle_at and len(v) == VALUE_LEN]
    assert inspect_misses.explain(sample, [*sample.answer.tolist(), 99]) is None
    why = inspect_misses.explain(sample, [*value, END])
    answer, got = why.split(" | ")
    assert f"@{sample.needle_at}" in answer and f"{list(value)}@{pos}" in got
    assert inspect_misses.explain(sample, [END]).endswith("got (nothing)")
    assert "@?" in inspect_misses.explain(sample, [7, 7, 7, 7, END])


def test_it_runs_a_config_cell_on_the_testbed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [
        "inspect_misses.py", str(CONFIGS / "quickstart.toml"), "--policy", "dense",
        "--task", "passkey", "--context", "1024", "--depth", "0.5"])
    inspect_misses.main()
    assert capsys.readouterr().out.splitlines()[-1] == (
        "dense passkey 1024 depth 0.5 seed 0: 2 of 2 right")


def test_a_depth_outside_the_config_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "inspect_misses.py", str(CONFIGS / "quickstart.toml"), "--policy", "dense",
        "--task", "passkey", "--context", "1024", "--depth", "0.3"])
    with pytest.raises(SystemExit, match=r"depths are \[0.0, 0.5, 1.0\]"):
        inspect_misses.main()
