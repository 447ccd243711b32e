import math
import re
from collections import Counter

import numpy as np
import pytest

from lserve_jax.lab.tasks import (
    ANSWER_WEIGHT,
    BOS,
    END,
    FILLER_START,
    IS,
    KEY_LEN,
    KEY_START,
    NEEDLE,
    NUM_FILLER,
    QUERY,
    SUCCESSOR_PROBS,
    TASKS,
    TRAIN_TASKS,
    VALUE_LEN,
    VALUE_START,
    VAR,
    filler,
    filler_successors,
    make_sample,
    make_samples,
    score,
    text_sample,
    training_sequence,
)

# Tokens before the target's start and after its end that depth does not move: BOS, the query
# (QUERY k1 k2 IS), the target (9) and the spans that must follow it (multivalue: 2 needles,
# vartrack: the 7-token hop).
FIXED = {"passkey": 1 + 4 + 9, "multikey": 1 + 4 + 9, "multivalue": 1 + 4 + 27,
         "vartrack": 1 + 4 + 9 + 7}
FACTS = {"passkey": 1, "multikey": 4, "multivalue": 3, "vartrack": 4}


def _spans(tokens):
    """(position, opener, key, content) of each NEEDLE/VAR/QUERY span; content stops before END
    (a query's content is its answer without END)."""
    tokens = [int(t) for t in tokens]
    out = []
    for i, t in enumerate(tokens):
        if t in (NEEDLE, VAR, QUERY):
            assert tokens[i + 3] == IS, tokens[i:i + 4]
            end = i + 4
            while end < len(tokens) and tokens[end] != END:
                end += 1
            out.append((i, t, tuple(tokens[i + 1:i + 3]), tuple(tokens[i + 4:end])))
    return out


def _resolve(facts, key):
    """The answer (END included) a query for `key` must get from the facts (position order)."""
    groups = [c for _, opener, k, c in facts if opener == NEEDLE and k == key]
    if groups:
        return tuple(v for group in groups for v in group) + (END,)
    (content,) = [c for _, opener, k, c in facts if opener == VAR and k == key]
    return (*content, END) if len(content) == VALUE_LEN else _resolve(facts, content)


def _check_chain(tokens):
    """Every filler token whose two predecessors are filler is one of their 3 successors."""
    is_filler = tokens >= FILLER_START
    at = np.flatnonzero(is_filler[2:] & is_filler[1:-1] & is_filler[:-2]) + 2
    assert len(at) > 0
    allowed = filler_successors()[tokens[at - 2] - FILLER_START, tokens[at - 1] - FILLER_START]
    assert (allowed == tokens[at, None]).any(axis=-1).all()


def test_successor_table():
    table = filler_successors()
    assert table.shape == (NUM_FILLER, NUM_FILLER, 3) and table.dtype == np.int32
    assert table.min() >= FILLER_START and table.max() < 256
    assert (np.sort(table, axis=-1)[..., 1:] != np.sort(table, axis=-1)[..., :-1]).all()
    assert not table.flags.writeable


def test_filler_follows_the_chain_with_its_probabilities():
    tokens = filler(30_000, np.random.default_rng(0))
    assert tokens.dtype == np.int32 and tokens.shape == (30_000,)
    _check_chain(tokens)
    nxt = filler_successors()[tokens[:-2] - FILLER_START, tokens[1:-1] - FILLER_START]
    freq = (nxt == tokens[2:, None]).mean(axis=0)
    # 30k draws: binomial std <= 0.003, so 0.015 is 5 sigma.
    np.testing.assert_allclose(freq, SUCCESSOR_PROBS, atol=0.015)
    assert filler(0, np.random.default_rng(0)).shape == (0,)
    assert filler(1, np.random.default_rng(0)).shape == (1,)


@pytest.mark.parametrize("task", TASKS)
def test_make_sample_is_deterministic(task):
    a, b = make_sample(task, 1000, 0.3, seed=5), make_sample(task, 1000, 0.3, seed=5)
    np.testing.assert_array_equal(a.prompt, b.prompt)
    np.testing.assert_array_equal(a.answer, b.answer)
    assert a.needle_at == b.needle_at
    assert not np.array_equal(a.prompt, make_sample(task, 1000, 0.3, seed=6).prompt)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("context", [512, 1000, 4096])
@pytest.mark.parametrize("task", TASKS)
def test_prompt_layout(task, context, depth):
    sample = make_sample(task, context, depth, seed=context + int(100 * depth))
    prompt, answer = sample.prompt, sample.answer
    assert (sample.task, sample.context, sample.depth) == (task, context, depth)
    assert prompt.dtype == np.int32 and prompt.shape == (context,)
    assert answer.dtype == np.int32 and answer[-1] == END
    assert prompt[0] == BOS and prompt[-4] == QUERY and prompt[-1] == IS
    assert sample.needle_at == 1 + round(depth * (context - FIXED[task]))
    *facts, query = _spans(prompt)
    assert query[0] == context - 4 and query[3] == ()
    assert len(facts) == FACTS[task]
    target = next(f for f in facts if f[0] == sample.needle_at)
    assert target[1] == (VAR if task == "vartrack" else NEEDLE)
    assert tuple(answer[:VALUE_LEN]) == target[3]
    assert tuple(answer) == _resolve(facts, query[2])
    symbols = [s for f in facts for s in f[2]]
    assert all(KEY_START <= s < VALUE_START for s in symbols)
    if task == "multivalue":  # one key; the target first, answer in position order
        assert {f[2] for f in facts} == {query[2]} and facts[0] is target
        assert len(answer) == 3 * VALUE_LEN + 1 and len({f[3] for f in facts}) == 3
    else:
        assert len(set(symbols)) == len(symbols)
    if task in ("passkey", "multikey"):
        assert target[2] == query[2]
    if task == "vartrack":  # the hop x2 -> x1 follows x1; distractors hold other values
        (hop,) = [f for f in facts if len(f[3]) == 2]
        assert hop[2] == query[2] and hop[3] == target[2] and hop[0] > target[0]
        others = [f for f in facts if f is not hop and f is not target]
        assert all(f[3] != target[3] for f in others)
    if depth == 1.0:  # the target and what must follow it end right before the query
        assert prompt[context - 5] == END
    _check_chain(prompt)


@pytest.mark.parametrize("task", TASKS)
def test_smallest_context_fits_at_every_depth(task):
    with pytest.raises(ValueError, match="context=") as info:
        make_sample(task, 5, 0.5, seed=0)
    smallest = int(re.search(r"needs at least (\d+)", str(info.value)).group(1))
    for seed in range(20):
        for depth in (0.0, 0.3, 0.7, 1.0):
            assert make_sample(task, smallest, depth, seed).prompt.shape == (smallest,)


def test_make_samples():
    samples = make_samples("multikey", 600, [0.0, 0.5, 1.0], n_per_depth=3, seed=2)
    assert [s.depth for s in samples] == [0.0] * 3 + [0.5] * 3 + [1.0] * 3
    assert len({s.prompt.tobytes() for s in samples}) == 9
    again = make_samples("multikey", 600, [0.0, 0.5, 1.0], n_per_depth=3, seed=2)
    assert all(np.array_equal(a.prompt, b.prompt) for a, b in zip(samples, again))


def test_score():
    answer = np.array([81, 90, 99, 100, END], np.int32)
    assert score([81, 90, 99, 100, END], answer)
    assert score(np.array([81, 90, 99, 100, END, 7, 7]), answer)  # extra tokens are ignored
    assert not score([81, 90, 99, 101, END], answer)
    assert not score([81, 90, 99, 100, 7], answer)
    assert not score([81, 90, 99, 100], answer)  # too short
    assert not score([], answer)


def _task_of(facts):
    if any(f[1] == VAR for f in facts):
        return "vartrack"
    if len(facts) == 3 and len({f[2] for f in facts}) == 1:
        return "multivalue"
    return "passkey" if len(facts) == 1 else "multikey"


def _check_training_row(tokens, weights, length, queries):
    """Shapes, answers that resolve from the facts before them, loss weights, filler chain.
    Returns (queries, facts) as `_spans` tuples."""
    assert tokens.shape == weights.shape == (length,)
    assert tokens.dtype == np.int32 and weights.dtype == np.float32
    assert tokens[0] == BOS and weights[0] == 0.0
    spans = _spans(tokens)
    asked = [s for s in spans if s[1] == QUERY]
    facts = [s for s in spans if s[1] != QUERY]
    assert len(asked) == queries and spans[-1] is asked[-1] and tokens[-1] == END
    answer_weight = np.zeros(length, bool)
    for pos, _, key, content in asked:
        start = pos + 4
        answer = (*content, END)
        assert answer == _resolve([f for f in facts if f[0] < pos], key)
        answer_weight[start:start + len(answer)] = True
        assert (weights[pos:pos + 3] == 0).all() and weights[pos + 3] == 1  # QUERY k k | IS
    for pos, _, key, content in facts:
        assert (weights[pos:pos + 3] == 0).all() and weights[pos + 3] == 1
        end = pos + 4 + len(content)
        assert (weights[pos + 4:end] == 0).all() and weights[end] == 1  # content | END
    np.testing.assert_array_equal(weights == ANSWER_WEIGHT, answer_weight)
    is_filler = tokens >= FILLER_START
    predictable = is_filler & np.r_[False, False, is_filler[:-2] & is_filler[1:-1]]
    np.testing.assert_array_equal(weights[is_filler], predictable[is_filler].astype(float))
    _check_chain(tokens)
    return asked, facts


@pytest.mark.parametrize("length", [256, 1000, 8192])
def test_training_sequence(length):
    seen = set()
    for seed in range(24):
        tokens, weights = training_sequence(np.random.default_rng(seed), length)
        _, facts = _check_training_row(tokens, weights, length, 8)
        task = _task_of(facts)
        seen.add(task)
        if task == "multikey":
            assert 4 <= len(facts) <= 8
    assert seen == set(TASKS)


def _tasks_of(facts):
    """The training task instances the facts come from (keys are distinct across instances)."""
    if any(f[1] == VAR for f in facts):
        yield "vartrack"
    groups = Counter(f[2] for f in facts if f[1] == NEEDLE)
    yield from {"passkey" if n == 1 else "multivalue" for n in groups.values()}


@pytest.mark.parametrize("length,queries", [(256, 2), (1000, 8), (8192, 20)])
def test_distinct_training_sequence(length, queries):
    seen = set()
    for seed in range(24):
        tokens, weights = training_sequence(np.random.default_rng(seed), length, queries,
                                            distinct=True)
        asked, facts = _check_training_row(tokens, weights, length, queries)
        assert len({key for _, _, key, _ in asked}) == queries  # no question is repeated
        keys = {key for _, _, key, _ in facts}
        assert len({symbol for key in keys for symbol in key}) == KEY_LEN * len(keys)
        assert set(Counter(f[2] for f in facts if f[1] == NEEDLE).values()) <= {1, 3}
        seen.update(_tasks_of(facts))
    assert seen == set(TRAIN_TASKS)


def test_training_sequence_arguments():
    tokens, _ = training_sequence(np.random.default_rng(0), 256, queries=2)
    assert sum(s[1] == QUERY for s in _spans(tokens)) == 2
    a = training_sequence(np.random.default_rng(9), 512)
    b = training_sequence(np.random.default_rng(9), 512)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="length=100"):
        training_sequence(np.random.default_rng(0), 100)
    with pytest.raises(ValueError, match="queries=0"):
        training_sequence(np.random.default_rng(0), 1000, queries=0)
    with pytest.raises(ValueError, match="length=300"):
        training_sequence(np.random.default_rng(0), 300, queries=8, distinct=True)
    with pytest.raises(ValueError, match="queries=33"):
        training_sequence(np.random.default_rng(0), 8192, queries=33, distinct=True)


class _Whitespace:
    def encode(self, text):
        return text.split()


class _WithBos:
    def encode(self, text):
        return ["<s>", *text.split()]


@pytest.mark.parametrize("tokenizer", [_Whitespace(), _WithBos()])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_text_sample(task, depth, tokenizer):
    for context_tokens in (300, 2000, 8000):
        prompt, answer = text_sample(task, context_tokens, depth, 3, tokenizer)
        assert re.fullmatch(r" \d{7}", answer)
        needles = re.findall(r"The special magic number for (\w+) is (\d{7})\.", prompt)
        assert len(needles) == (1 if task == "passkey" else 4)
        key = re.search(r"What is the special magic number for (\w+)\?", prompt).group(1)
        assert dict(needles)[key] == answer.strip()
        assert prompt.endswith(f"The special magic number for {key} is")
        assert abs(len(tokenizer.encode(prompt)) - context_tokens) <= 0.05 * context_tokens
        if task == "passkey" and depth == 0.0:
            assert prompt.startswith("The special magic number")
        if task == "passkey" and depth == 1.0:
            assert f"{answer.strip()}. What is" in prompt


@pytest.mark.parametrize("call, match", [
    (lambda: make_sample("nope", 1000, 0.5, 0), "task='nope'"),
    (lambda: make_sample("passkey", 1000, -0.1, 0), "depth=-0.1"),
    (lambda: make_sample("passkey", 1000, 1.5, 0), "depth=1.5"),
    (lambda: make_sample("passkey", 1000, math.nan, 0), "depth=nan"),
    (lambda: make_sample("vartrack", 40, 0.5, 0), "context=40"),
    (lambda: text_sample("vartrack", 1000, 0.5, 0, _Whitespace()), "task='vartrack'"),
    (lambda: text_sample("passkey", 1000, 2.0, 0, _Whitespace()), "depth=2.0"),
    (lambda: text_sample("multikey", 20, 0.5, 0, _Whitespace()), "context_tokens=20"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        call()
