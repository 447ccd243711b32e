import dataclasses
import functools
import json

import pytest

from lserve_jax.config import (CacheConfig, ModelConfig, ParallelConfig, RunConfig,
                               SparsityConfig, check_compatible, check_parallel, from_dict)
from lserve_jax.engine import Engine
from lserve_jax.lab.experiment import ExperimentConfig, load_experiment


def test_presets_have_the_published_shapes():
    llama3 = ModelConfig.from_name("llama3-8b")
    assert (llama3.n_layers, llama3.n_heads, llama3.n_kv_heads, llama3.head_dim) == (32, 32, 8, 128)
    assert llama3.kv_bytes_per_token == 128 * 1024  # 128 KiB per token per sequence
    assert llama3.rope_scaling is not None and llama3.rope_theta == 500000.0
    llama2 = ModelConfig.from_name("llama2-7b", dtype="float32")
    assert llama2.n_kv_heads == 32 and llama2.rope_scaling is None and llama2.dtype == "float32"


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_heads=6, n_kv_heads=4), "n_kv_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(dtype="float16"), "dtype"),
    (dict(dim=0), "dim"),
])
def test_bad_model_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(policy="bogus"), "policy"),
    (dict(token_budget=1000), "token_budget"),
    (dict(logical_page_size=48), "logical_page_size"),
    (dict(page_size=48, logical_page_size=16, token_budget=480), "page_size"),
    (dict(policy="quest"), "logical_page_size"),
    (dict(static_sparsity=1.5), "static_sparsity"),
    (dict(selection_granularity="token"), "selection_granularity"),
    (dict(reuse_interval=0), "reuse_interval"),
])
def test_bad_sparsity_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SparsityConfig.{field}"):
        SparsityConfig(**kwargs)


def test_budget_error_suggests_a_multiple():
    with pytest.raises(ValueError, match="e.g. 1024"):
        SparsityConfig(token_budget=1000)


def test_quest_uses_flat_pages_of_the_logical_size():
    quest = SparsityConfig().for_policy("quest")
    assert quest.page_size == quest.logical_page_size == 16 and quest.dynamic and not quest.static
    assert SparsityConfig().budget_pages == 64 and SparsityConfig(token_budget=64).budget_pages == 3


def test_cross_config_check():
    with pytest.raises(ValueError, match="dense_layers"):
        check_compatible(ModelConfig(n_layers=2), SparsityConfig(dense_layers=3))


def test_run_config_validation():
    with pytest.raises(ValueError, match="RunConfig.top_p"):
        RunConfig(top_p=0.0)
    with pytest.raises(ValueError, match="RunConfig.backend"):
        RunConfig(backend="tpu")


def _hf_config(**extra):
    return {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True, **extra}


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_from_hf_reads_transformers4_and_5_rope_formats(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps(
        _hf_config(rope_theta=500000.0, rope_scaling=LLAMA3)))
    (tmp_path / "b" / "config.json").write_text(json.dumps(
        _hf_config(rope_parameters={**LLAMA3, "rope_theta": 500000.0})))
    a, b = ModelConfig.from_hf(tmp_path / "a"), ModelConfig.from_hf(tmp_path / "b")
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling.factor == 8.0
    assert a.head_dim == 8 and a.tie_embeddings and a.norm_eps == 1e-6


def test_from_hf_rejects_unsupported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        _hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(attention_bias=True)))
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("drop", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_from_hf_names_a_missing_field_and_the_file(tmp_path, drop):
    (tmp_path / "config.json").write_text(json.dumps(
        {k: v for k, v in _hf_config().items() if k != drop}))
    with pytest.raises(ValueError, match=f"config.json: {drop}.*missing"):
        ModelConfig.from_hf(tmp_path)


def test_from_hf_names_a_malformed_file(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**_hf_config(), "hidden_size": "wide"}))
    with pytest.raises(ValueError, match="hidden_size='wide' is not a int"):
        ModelConfig.from_hf(tmp_path)


def test_experiment_files_are_strict(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('name = "x"\n[sparsity]\ntoken_budget = 128\npage_size = 32\n')
    exp = load_experiment(path)
    assert exp.sparsity.token_budget == 128 and exp.name == "x"
    path.write_text('[sparsity]\ntoken_bugdet = 128\n')
    with pytest.raises(ValueError, match="token_bugdet"):
        load_experiment(path)
    with pytest.raises(ValueError, match="ExperimentConfig.policies"):
        from_dict(ExperimentConfig, {"policies": ["dense", "sparse"]})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SparsityConfig().token_budget = 8


@pytest.mark.parametrize("parallel,cache,field", [
    (dict(tp=4), {}, "ParallelConfig.tp"),  # the tiny model has 2 KV heads
    (dict(tp=2, dp=3), {}, "ParallelConfig.dp"),  # 4 slots over 3 replicas
    (dict(tp=2), dict(num_pages=101), "CacheConfig.num_pages"),
    (dict(tp=2), {}, None),
])
def test_parallel_config_names_what_the_mesh_needs(parallel, cache, field):
    check = functools.partial(check_parallel, ModelConfig(), CacheConfig(**cache),
                              ParallelConfig(**parallel))
    if field is None:
        check()
    else:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            check()
    with pytest.raises(ValueError, match="shard_vocab"):
        check_parallel(ModelConfig(vocab_size=511), CacheConfig(), ParallelConfig(tp=2))
    with pytest.raises(ValueError, match="ParallelConfig.tp"):
        ParallelConfig(tp=0)


def test_a_mesh_larger_than_the_devices_is_refused():
    with pytest.raises(ValueError, match="needs 2 devices and jax sees 1"):
        Engine(ModelConfig(), None, parallel=ParallelConfig(tp=2))
