"""`lserve identify-heads` on the HF fixture: the pattern it writes serves, the needle prompts
are exactly as long as asked with the answer marked, and bad input is named."""

import json
import pathlib

import numpy as np
import pytest

from lserve_jax.cli import main
from lserve_jax.config import CacheConfig, SparsityConfig
from lserve_jax.lab.needles import NeedlePrompts
from lserve_jax.llm import LLM
from lserve_jax.model.hf import load_tokenizer
from lserve_jax.sampling import SamplingParams
from lserve_jax.sparsity.heads import load_pattern
from lserve_jax.sparsity.policy import STREAM, retrieval_heads

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "hf_tiny_llama"


def _find(tokens: np.ndarray, piece: np.ndarray) -> list[int]:
    """Where `piece` starts in `tokens`."""
    return [i for i in range(len(tokens) - len(piece) + 1)
            if np.array_equal(tokens[i:i + len(piece)], piece)]


def test_identified_heads_load_and_serve(tmp_path, capsys):
    out = tmp_path / "pattern"
    main(["identify-heads", str(FIXTURE), "--out", str(out), "--steps", "3", "--warmup", "1",
          "--length", "256", "--sink", "4", "--local", "32", "--lr", "0.3"])
    pattern = load_pattern(out)
    assert pattern.gates.shape == (2, 2)  # [n_layers, n_kv_heads] of the fixture
    assert ((pattern.gates >= 0) & (pattern.gates < 1)).all()  # trained down from 1
    assert (pattern.sink_size, pattern.recent_size) == (4, 32)
    record = json.loads((out / "gates.json").read_text())
    np.testing.assert_allclose(record["gates"], pattern.gates, rtol=1e-6)
    assert record["config"]["steps"] == 3 and record["history"][-1]["step"] == 2
    assert record["git_commit"] and record["date"] and record["jax_version"]
    printed = capsys.readouterr().out
    assert str(out / "full_attention_heads.tsv") in printed and "layer   1:" in printed

    sparsity = SparsityConfig(policy="lserve", head_pattern=str(out), page_size=16,
                              logical_page_size=4, token_budget=48, prefill_sink=16,
                              prefill_local=32, decode_sink=16, decode_local=16)
    llm = LLM(str(FIXTURE), sparsity, CacheConfig(max_seq_len=320, max_batch=1))
    streaming = llm.engine.modes == STREAM
    assert streaming.any() and (streaming == ~retrieval_heads(pattern.gates, 0.5)).all()
    tokens, answer = NeedlePrompts(llm.tokenizer)(np.random.default_rng(1), 256)
    done = llm.generate([tokens[~answer].tolist()], SamplingParams(max_tokens=1), use_tqdm=False)
    assert done[0].outputs[0].finish_reason == "length" and len(done[0].outputs[0].token_ids) == 1


def test_needle_prompts_are_as_long_as_asked_with_the_answer_marked():
    tokenizer = load_tokenizer(FIXTURE)
    prompts = NeedlePrompts(tokenizer)
    rng = np.random.default_rng(0)
    questions = {kind: np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
                 for kind, text in (("passkey", " What is the pass key?"),
                                    ("word", " What is the special word for"))}
    kinds = set()
    for length in (prompts.min_length, prompts.min_length + 37, 700) * 4:
        tokens, answer = prompts(rng, length)
        assert tokens.shape == answer.shape == (length,)
        assert tokens.dtype == np.int32 and answer.dtype == bool
        assert tokens[0] == tokenizer.bos_token_id
        first = int(np.argmax(answer))
        assert 2 <= answer.sum() <= 8 and answer[first:].all()  # the last tokens, only
        assert _find(tokens[:first], tokens[answer])  # the needle holds the answer
        kinds |= {kind for kind, q in questions.items() if _find(tokens, q)}
    assert kinds == {"passkey", "word"}
    again = NeedlePrompts(tokenizer)(np.random.default_rng(0), prompts.min_length)
    np.testing.assert_array_equal(again[0], prompts(np.random.default_rng(0),
                                                    prompts.min_length)[0])
    with pytest.raises(ValueError, match=f"GateConfig.length={prompts.min_length - 1} "):
        prompts(rng, prompts.min_length - 1)


def test_bad_identify_heads_input_is_named(tmp_path):
    with pytest.raises(SystemExit, match="GateConfig.length=100 .*--length"):
        main(["identify-heads", str(FIXTURE), "--out", str(tmp_path), "--length", "100"])
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for file in FIXTURE.iterdir():
        if not file.name.startswith("tokenizer"):
            (bare / file.name).symlink_to(file)
    with pytest.raises(SystemExit, match="has no tokenizer .*copy the model's tokenizer"):
        main(["identify-heads", str(bare), "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["identify-heads", str(tmp_path / "missing"), "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match="usage"):
        main(["identify-heads"])
    assert not (tmp_path / "p").exists()
