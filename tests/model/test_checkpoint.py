"""Project checkpoints: round trip, and damaged files named in the error."""

import json

import jax
import numpy as np
import pytest

from lserve_jax.config import ModelConfig
from lserve_jax.model import load_model
from lserve_jax.model.checkpoint import load_checkpoint, save_checkpoint
from lserve_jax.model.llama import init_params

CFG = ModelConfig(n_layers=1)


@pytest.fixture
def saved(tmp_path):
    params = init_params(CFG, jax.random.key(0))
    save_checkpoint(tmp_path, CFG, params)
    return tmp_path, params


def test_round_trip(saved):
    path, params = saved
    cfg, loaded = load_checkpoint(path)
    assert cfg == CFG
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert load_model(str(path)).pattern is None


def test_damaged_model_json_is_named(saved):
    path, _ = saved
    (path / "model.json").write_text('{"dim": 64,')
    with pytest.raises(ValueError, match="model.json is not a ModelConfig"):
        load_checkpoint(path)
    (path / "model.json").write_text(json.dumps({"dim": 64, "colour": "red"}))
    with pytest.raises(ValueError, match="model.json is not a ModelConfig"):
        load_checkpoint(path)


def test_damaged_params_are_named(saved):
    path, _ = saved
    for file in (path / "params").rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="params could not be read"):
        load_checkpoint(path)
