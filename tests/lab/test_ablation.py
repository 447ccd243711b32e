import dataclasses
import json
import pathlib
import tomllib

import jax
import numpy as np
import pytest

from lserve_jax.cli import main
from lserve_jax.config import CacheConfig, ModelConfig, SparsityConfig
from lserve_jax.engine import CompletionOutput, Engine, RequestMetrics, RequestOutput
from lserve_jax.lab import ablation
from lserve_jax.lab.ablation import apply_sweep, run_accuracy, variants, write_accuracy
from lserve_jax.lab.experiment import ExperimentConfig, load_experiment
from lserve_jax.sparsity.heads import policy_gates

# the `lserve run` configs (they set `task`; other files there configure training scripts)
CONFIGS = [path for path in sorted(
    (pathlib.Path(__file__).parents[2] / "experiments" / "configs").glob("*.toml"))
    if "task" in tomllib.loads(path.read_text())]

# Windows small enough that lserve is sparse at 256-320 tokens ("tiny": random weights, vocab 512).
SMALL = ExperimentConfig(
    name="small", task="accuracy", model="tiny", policies=("dense", "lserve"), contexts=(256, 320),
    tasks=("passkey", "vartrack"), depths=(0.0, 1.0), samples=2, cache=CacheConfig(max_batch=8),
    sparsity=SparsityConfig(page_size=32, logical_page_size=16, token_budget=64, prefill_sink=16,
                            prefill_local=64, decode_sink=16, decode_local=32,
                            head_pattern="random:0"))
# reuse_interval 4 is SMALL's own lserve cell at 256 tokens: its compiled steps are reused
SWEEP = dataclasses.replace(SMALL, name="reuse", policies=("lserve",), contexts=(256,),
                            tasks=("passkey",), sweep="reuse_interval", sweep_values=("4", "1"))


@pytest.fixture(scope="module")
def rows():
    return run_accuracy(SMALL)


@pytest.fixture(scope="module")
def sweep_rows():
    return run_accuracy(SWEEP)


@pytest.mark.xdist_group("accuracy_rows")  # one worker computes the grids once
def test_one_row_per_cell(rows):
    cells = {(r["policy"], r["variant"], r["task"], r["context"], r["depth"]) for r in rows}
    assert len(rows) == len(cells) == 2 * 2 * 2 * 2
    assert {r["variant"] for r in rows} == {"-"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 2 for r in rows)
    at = {(r["policy"], r["context"]): r for r in rows}
    assert at[("lserve", 320)]["attended_per_step"] < at[("dense", 320)]["attended_per_step"] == 320
    assert at[("lserve", 320)]["kv_kib_per_seq"] < at[("dense", 320)]["kv_kib_per_seq"]


@pytest.mark.xdist_group("accuracy_rows")  # one worker computes the grids once
def test_sweep_gives_rows_per_value(sweep_rows):
    assert [r["variant"] for r in sweep_rows] == ["4", "4", "1", "1"]  # 2 depths each


def test_page_size_values_set_physical_and_logical_pages():
    base = SparsityConfig(token_budget=256)
    hierarchical = apply_sweep(base, "page_size", "64/16")
    flat = apply_sweep(base, "page_size", "16")
    assert (hierarchical.page_size, hierarchical.logical_page_size) == (64, 16)
    assert (flat.page_size, flat.logical_page_size) == (16, 16)
    assert apply_sweep(base, "keep_sink_page", "true").keep_sink_page is True
    assert apply_sweep(base, "static_sparsity", "0.25").static_sparsity == 0.25


def test_toml_values_become_text(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('task = "accuracy"\nsweep = "keep_sink_page"\nsweep_values = [false, true]\n')
    assert load_experiment(path).sweep_values == ("false", "true")


@pytest.mark.parametrize("kwargs, match", [
    ({"sweep": "bogus", "sweep_values": ("1",)}, "ExperimentConfig.sweep="),
    ({"sweep": "policy", "sweep_values": ("dense",)}, "ExperimentConfig.sweep="),
    ({"sweep": "reuse_interval"}, "ExperimentConfig.sweep_values"),
    ({"tasks": ("haystack",)}, "ExperimentConfig.tasks"),
    ({"depths": (1.5,)}, "ExperimentConfig.depths"),
    ({"contexts": ()}, "ExperimentConfig.contexts"),
    ({"samples": 0}, "ExperimentConfig.samples"),
])
def test_bad_experiment_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(SMALL, **kwargs)


@pytest.mark.parametrize("field, value, match", [
    ("reuse_interval", "four", "sweep_values.*'four'.*SparsityConfig.reuse_interval"),
    ("keep_sink_page", "yes", "sweep_values.*SparsityConfig.keep_sink_page"),
    ("page_size", "64/x", "sweep_values.*SparsityConfig.page_size"),
    ("token_budget", "100", "sweep_values.*token_budget='100'.*SparsityConfig.token_budget"),
])
def test_bad_sweep_value_fails_before_any_decoding(field, value, match):
    exp = dataclasses.replace(SMALL, sweep=field, sweep_values=(value,))
    with pytest.raises(ValueError, match=match):
        run_accuracy(exp)


def test_refused_prompt_is_an_error_not_a_miss(monkeypatch):
    class Refusing(Engine):
        def generate(self, prompts, params=None, progress=False):
            refused = CompletionOutput(0, None, [], "refused")
            return [RequestOutput(f"req-{i}", None, p, [refused], True, RequestMetrics(0.0),
                                  "pool too small") for i, p in enumerate(prompts)]

    monkeypatch.setattr(ablation, "Engine", Refusing)
    exp = dataclasses.replace(SMALL, policies=("dense",), contexts=(256,), tasks=("passkey",))
    with pytest.raises(RuntimeError, match="refused.*pool too small"):
        run_accuracy(exp)


@pytest.mark.xdist_group("accuracy_rows")  # one worker computes the grids once
def test_write_accuracy(tmp_path, rows, sweep_rows, capsys):
    paths = write_accuracy(SMALL, rows, tmp_path / "plain")
    written = json.loads(paths[0].read_text())
    assert written["platform"] == "cpu" and written["jax_version"] == jax.__version__
    assert written["date"][:2] == "20"
    assert [p.name for p in paths] == ["small.json", "small.md", "small_heatmap.png"]
    assert json.loads(paths[0].read_text())["rows"] == rows
    assert "| lserve | " in paths[1].read_text()
    assert "| policy | 256 | 320 |" in capsys.readouterr().out
    paths = write_accuracy(SWEEP, sweep_rows, tmp_path / "sweep")
    assert [p.name for p in paths][-1] == "reuse_bars.png"
    assert all(p.stat().st_size > 0 for p in paths)
    assert "| policy | reuse_interval | 256 |" in paths[1].read_text()


def test_cli_runs_the_accuracy_task(tmp_path, capsys):
    path = tmp_path / "acc.toml"
    path.write_text('name = "acc"\ntask = "accuracy"\npolicies = ["dense"]\ncontexts = [256]\n'
                    'depths = [0.5]\nsamples = 1\ntasks = ["passkey"]\n')
    main(["run", str(path), "--output-dir", str(tmp_path)])
    assert "| dense | " in capsys.readouterr().out
    assert json.loads((tmp_path / "acc.json").read_text())["rows"][0]["n"] == 1


def test_random_head_pattern_only_when_asked_for(tmp_path):
    cfg = ModelConfig(n_layers=6, n_kv_heads=2, n_heads=4)
    gates = policy_gates(SparsityConfig(head_pattern="random:3"), cfg)
    assert gates.shape == (6, 2) and np.all((gates >= 0) & (gates <= 1))
    np.testing.assert_array_equal(gates, policy_gates(SparsityConfig(head_pattern="random:3"),
                                                      cfg, own_pattern=tmp_path))
    assert not np.array_equal(gates, policy_gates(SparsityConfig(head_pattern="random:4"), cfg))
    with pytest.raises(ValueError, match="random:SEED"):
        SparsityConfig(head_pattern="random:x")
    with pytest.raises(ValueError, match="SparsityConfig.head_pattern"):
        SparsityConfig(head_pattern="random:-1")
    # a sparse policy on a model with no pattern of its own is an error, never random heads
    for policy in ("duo", "lserve"):
        with pytest.raises(ValueError, match="sparsity.head_pattern"):
            policy_gates(SparsityConfig(policy=policy), cfg)
    for policy in ("dense", "streaming", "quest"):
        assert policy_gates(SparsityConfig().for_policy(policy), cfg) is None
    with pytest.raises(SystemExit, match="sparsity.head_pattern"):
        main(["generate", "--tokens", "1", "2", "--sparsity.policy", "lserve"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_experiment_config_loads(path):
    exp = load_experiment(path)
    if exp.task == "accuracy":
        assert len(variants(exp)) == max(1, len(exp.sweep_values))  # valid under every policy


def _one_per_kind(paths):
    """The accuracy configs, one per way a grid runs its variants: no sweep (the README's
    quickstart), head patterns (gates per variant), precisions (a model and a KV format per
    variant). A SparsityConfig sweep runs end to end in test_sweep_gives_rows_per_value, and
    every config's values are parsed by test_every_experiment_config_loads."""
    kinds = {}
    for path in sorted(paths, key=lambda p: p.stem != "quickstart"):
        exp = load_experiment(path)
        if exp.task == "accuracy" and exp.sweep in ("", "precision", "head_pattern"):
            kinds.setdefault(exp.sweep, path)
    return sorted(kinds.values())


@pytest.mark.parametrize("path", _one_per_kind(CONFIGS), ids=lambda p: p.stem)
def test_accuracy_configs_run_at_toy_size(path, tmp_path):
    """An accuracy config of each kind, shrunk (one short context, one task and depth, one
    prompt, its last sweep value, its last policy; every policy and value of every config is
    built by test_every_experiment_config_loads), runs end to end on its own model and writes
    its files."""
    exp = load_experiment(path)
    exp = dataclasses.replace(exp, contexts=(320,), tasks=("passkey",), depths=(0.5,), samples=1,
                              sweep_values=exp.sweep_values[-1:], policies=exp.policies[-1:],
                              output_dir=str(tmp_path))
    rows = run_accuracy(exp)
    assert len(rows) == max(1, len(exp.sweep_values))
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(p.exists() for p in write_accuracy(exp, rows, tmp_path))


HF_DIR = str(pathlib.Path(__file__).parents[1] / "fixtures" / "hf_tiny_llama")


def test_models_with_a_tokenizer_get_text_prompts_and_judges():
    from lserve_jax.model.hf import load_tokenizer

    tokenizer = load_tokenizer(HF_DIR)
    exp = dataclasses.replace(SMALL, model=HF_DIR, samples=2, depths=(0.5,))
    probes = ablation.text_probes("multikey", 300, 0, exp, tokenizer)
    assert len(probes) == 2 and probes[0].prompt != probes[1].prompt
    # sized by whole filler sentences: within one sentence (~50 characters) of the request
    assert all(240 <= len(probe.prompt) <= 300 for probe in probes)
    rows = run_accuracy(dataclasses.replace(exp, policies=("dense",), tasks=("passkey",),
                                            contexts=(200,), depths=(0.5,), samples=1))
    assert len(rows) == 1 and rows[0]["accuracy"] in (0.0, 1.0)


def test_text_judge_accepts_the_answer_and_rejects_others():
    from lserve_jax.lab.tasks import text_sample
    from lserve_jax.model.hf import load_tokenizer

    tokenizer = load_tokenizer(HF_DIR)
    exp = dataclasses.replace(SMALL, model=HF_DIR, samples=1)
    probe = ablation.text_probes("passkey", 300, 0, exp, tokenizer)[0]
    _, answer = text_sample("passkey", 300, 0.0, exp.run.seed * len(exp.depths), tokenizer)
    right = list(tokenizer.encode(answer + " and more", add_special_tokens=False))
    wrong = list(tokenizer.encode(" 1" + answer.strip()[1:][::-1], add_special_tokens=False))
    assert probe.judge(right) and not probe.judge(wrong) and not probe.judge([])


def test_a_grid_cut_short_keeps_the_cells_it_measured(tmp_path):
    exp = dataclasses.replace(SWEEP, output_dir=str(tmp_path))
    seen = []

    def cut_after_first(rows, done, total):
        ablation.write_partial(exp, rows, done, total)
        seen.append((len(rows), done, total))
        raise KeyboardInterrupt  # the time limit of a device call

    with pytest.raises(KeyboardInterrupt):
        run_accuracy(exp, on_cell=cut_after_first)
    record = json.loads((tmp_path / "reuse.json").read_text())
    assert seen == [(2, 1, 2)] and record["partial"] == "1 of 2 cells"
    assert [r["variant"] for r in record["rows"]] == ["4", "4"] and record["platform"] == "cpu"


def test_every_prompt_of_a_grid_has_its_own_world():
    """Each (depth, sample) of a context draws its own keys and values, the depth's prompts equal
    make_sample's at that depth, and the same grid gives the same prompts again."""
    from lserve_jax.lab.tasks import make_sample, probe_seed

    exp = dataclasses.replace(SMALL, depths=(0.0, 0.5, 1.0), samples=2)
    answers = [tuple(p.judge.keywords["answer"]) for at in range(3)
               for p in ablation.token_probes("passkey", 300, at, exp)]
    assert len(set(answers)) == len(answers) == 6
    again = ablation.token_probes("passkey", 300, 1, exp)
    want = make_sample("passkey", 300, 0.5, probe_seed(exp.run.seed, 3, 1, 2, 1))
    assert again[1].prompt == want.prompt.tolist()


def test_a_bad_precision_value_is_named():
    exp = dataclasses.replace(SMALL, sweep="precision", sweep_values=("fp8/int8", "fp8/int3"))
    with pytest.raises(ValueError, match="'fp8/int3' is not a precision"):
        variants(exp)
