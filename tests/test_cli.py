import json
import pathlib
import socket
import subprocess
import sys
import time

import httpx
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


def test_your_own_llama_command_of_the_readme(capsys):
    """README, "LServe on your own Llama", on the HF fixture: an HF directory, a DuoAttention
    pattern, the kernels (interpreted); generation stops at the tokenizer's EOS."""
    main(["generate", "--model", "tests/fixtures/hf_tiny_llama", "--sparsity.policy", "lserve",
          "--sparsity.head-pattern", "tests/fixtures/hf_tiny_llama_pattern",
          "--prompt", "The special magic number is", "--run.backend", "pallas_interpret",
          "--run.max-new-tokens", "8"])
    out = capsys.readouterr().out
    tokens = [int(t) for t in out.split("[")[1].split("]")[0].split(",")]
    assert "text: " in out and 0 < len(tokens) <= 8
    assert 2 not in tokens[:-1]  # the fixture's EOS ends the answer when it comes
    assert ("(stop)" in out) == (tokens[-1] == 2)


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


def test_serve_command_answers_over_http():
    """`lserve serve MODEL` starts a server whose flags reach the engine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "lserve_jax.cli", "serve", "tiny", "--port", str(port),
         "--cache.max-batch", "1", "--cache.num-pages", "33"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        health = None
        for _ in range(240):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health").json()
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read().decode()
                time.sleep(0.25)
        assert health == {"status": "ok", "running": 0, "waiting": 0, "free_pages": 32,
                          "total_pages": 32}
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}).json()
        assert len(out["choices"][0]["token_ids"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=30)
