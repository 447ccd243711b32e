import os
import pathlib

import numpy as np
import pytest

from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.sparsity.heads import load_gates, load_pattern, save_pattern
from lserve_jax.sparsity.policy import DENSE, SELECT, STREAM, head_modes, retrieval_heads

PATTERNS = pathlib.Path(os.environ.get(
    "LSERVE_DUO_PATTERNS", pathlib.Path(__file__).parents[3] / "shared" / "duo_patterns"))
PUBLISHED = {  # ../shared/duo_patterns/README.md: retrieval KV heads per layer at sparsity 0.5
    "Llama-3-8B-Instruct-Gradient-1048k":
        "1,1,3,2,2,4,2,4,6,4,5,3,2,6,5,5,5,6,3,5,6,3,3,6,4,5,3,4,6,5,8,3",
    "Meta-Llama-3.1-8B-Instruct":
        "2,3,4,1,4,2,2,6,4,6,5,5,2,8,4,5,4,6,3,4,5,2,4,5,3,3,3,4,5,5,8,1",
    "Llama-2-7B-32K-Instruct":
        "12,21,4,10,4,11,14,13,14,13,18,17,18,19,23,20,21,20,21,19,19,15,20,9,17,14,20,9,12,15,"
        "22,28",
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_patterns_give_the_published_retrieval_counts(name):
    if not PATTERNS.exists():  # another project's data, read by path and never copied here
        pytest.skip(f"published patterns not found at {PATTERNS}: set LSERVE_DUO_PATTERNS")
    pattern = load_pattern(PATTERNS / name)
    assert (pattern.sink_size, pattern.recent_size) == (128, 256)
    counts = retrieval_heads(pattern.gates, 0.5).sum(axis=1)
    assert counts.tolist() == [int(c) for c in PUBLISHED[name].split(",")]


def test_split_is_deterministic_with_ties_kept_retrieval():
    gates = np.array([[0.1, 0.5, 0.5, 0.9], [0.5, 0.2, 0.0, 1.0]])
    kept = retrieval_heads(gates, 0.5)
    assert kept.tolist() == [[False, True, True, True], [True, False, False, True]]
    assert retrieval_heads(gates, 0.0).all() and not retrieval_heads(gates, 1.0).any()


def test_modes_follow_the_policy():
    cfg = ModelConfig(n_layers=4, n_kv_heads=2)
    gates = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.05, 0.95]])
    lserve = head_modes(cfg, SparsityConfig(), gates)
    assert lserve.tolist() == [[SELECT, STREAM], [SELECT, STREAM], [STREAM, SELECT],
                               [STREAM, SELECT]]
    duo = head_modes(cfg, SparsityConfig(policy="duo", dense_layers=1), gates)
    assert duo.tolist() == [[DENSE, DENSE], [DENSE, STREAM], [STREAM, DENSE], [STREAM, DENSE]]
    quest = head_modes(cfg, SparsityConfig(dense_layers=2).for_policy("quest"))
    assert quest.tolist() == [[DENSE] * 2] * 2 + [[SELECT] * 2] * 2
    assert (head_modes(cfg, SparsityConfig(policy="streaming")) == STREAM).all()
    with pytest.raises(ValueError, match="head_pattern"):
        head_modes(cfg, SparsityConfig(policy="duo"))
    with pytest.raises(ValueError, match="shape"):
        head_modes(cfg, SparsityConfig(), gates[:3])


def test_patterns_round_trip(tmp_path):
    gates = np.random.default_rng(0).random((3, 4))
    save_pattern(tmp_path, gates, sink_size=64, recent_size=128, note="test")
    pattern = load_pattern(tmp_path)
    np.testing.assert_array_equal(pattern.gates, gates)
    assert (pattern.sink_size, pattern.recent_size) == (64, 128)


@pytest.mark.parametrize("text, match", [
    ("0.1\t0.2\n0.3\n", ":2: 1 heads, but line 1 has 2"),
    ("0.1\tnan\n", ":1: gate nan"),
    ("0.1\t1.7\n", ":1: gate 1.7"),
    ("0.1\tabc\n", ":1: not tab-separated"),
    ("0.1 0.2\n", ":1: not tab-separated"),
    ("\n", "holds no gates"),
])
def test_malformed_pattern_files_name_file_and_line(tmp_path, text, match):
    (tmp_path / "full_attention_heads.tsv").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_gates(tmp_path)
    assert "full_attention_heads.tsv" in str(err.value)


def test_pattern_without_config_is_reported(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("0.5\t0.5\n")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pattern(tmp_path)
    with pytest.raises(FileNotFoundError, match="full_attention_heads.tsv"):
        load_gates(tmp_path / "missing")
