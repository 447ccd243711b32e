import json
import pathlib

import pytest

from lserve_jax.cli import main

GENERATE_TINY = pathlib.Path(__file__).parents[1] / "experiments" / "configs" / "generate_tiny.toml"


def test_run_generate_config_with_overrides(tmp_path, capsys):
    main(["run", str(GENERATE_TINY), "--output-dir", str(tmp_path), "--run.max-new-tokens", "3",
          "--prompt-lengths", "40", "300", "--policies", "dense", "lserve"])
    table = capsys.readouterr().out
    assert "| lserve | 300 | 3 |" in table
    result = json.loads((tmp_path / "generate_tiny.json").read_text())
    assert result["config"]["run"]["max_new_tokens"] == 3
    rows = {(r["policy"], r["prompt_tokens"]): r for r in result["rows"]}
    assert rows[("lserve", 300)]["attended_per_step"] < rows[("dense", 300)]["attended_per_step"]
    assert rows[("lserve", 300)]["kv_kib_per_seq"] < rows[("dense", 300)]["kv_kib_per_seq"]


def test_generate_tokens(capsys):
    main(["generate", "--tokens", "1", "2", "3", "--run.max-new-tokens", "4"])
    assert "tokens: [" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["run"], "usage"),
    (["serve"], "usage"),
    (["run", "missing.toml"], "does not exist"),
    (["generate", "--prompt", "hello"], "tokenizer"),
])
def test_bad_invocations_exit_with_a_message(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_invalid_field_from_the_command_line_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--tokens", "1", "--sparsity.token-budget", "100"])
    assert "SparsityConfig.token_budget=100" in capsys.readouterr().err
