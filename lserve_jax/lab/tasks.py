"""Deterministic synthetic long-context retrieval tasks for the vocab-256 testbed Llama.

Tokens: 0 PAD, 1 BOS, 2 NEEDLE, 3 IS, 4 END, 5 QUERY, 6 VAR, 7..15 reserved, 16..79 KEY symbols,
80..111 VALUE symbols, 112..255 FILLER words. Filler is an order-2 Markov chain (3 possible next
words per (prev2, prev1) pair, probabilities SUCCESSOR_PROBS, fixed by LANGUAGE_SEED; a run starts
with 2 uniform words), so sink + local-window attention predicts it well. Spans, a key being 2 KEY
symbols (all distinct within a sequence): needle NEEDLE k1 k2 IS v1 v2 v3 v4 END, assignment VAR
k1 k2 IS v1 v2 v3 v4 END, hop VAR k1 k2 IS j1 j2 END (k holds j), query QUERY k1 k2 IS + answer
(END included). An eval prompt is BOS, filler holding the spans, and the query without answer:
  passkey     one needle.
  multikey    the target needle and 3 distractor needles at uniformly random places.
  multivalue  3 needles with one key and different values, the first at the requested depth, the
              others at random places after it; answer = the 3 value groups in position order.
  vartrack    assignment x1 at the requested depth, hop x2 -> x1 at a random place after it, 2
              distractor assignments with other values anywhere; the query asks for x2.
The target starts at 1 + round(depth * slack), slack = context - 1 - len(query) - len(target and
the spans that must follow it): depth 0 is right after BOS, 1 puts them right before the query.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

VOCAB_SIZE = 256
PAD, BOS, NEEDLE, IS, END, QUERY, VAR = range(7)
KEY_START, NUM_KEYS = 16, 64
VALUE_START, NUM_VALUES = 80, 32
FILLER_START, NUM_FILLER = 112, 144
KEY_LEN, VALUE_LEN = 2, 4
LANGUAGE_SEED, SUCCESSOR_PROBS = 0, (0.6, 0.3, 0.1)
ANSWER_WEIGHT = 5.0
TASKS = ("passkey", "multikey", "multivalue", "vartrack")
_FACT_LEN = KEY_LEN + VALUE_LEN + 3  # a needle, an assignment, a query with a 1-group answer


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy fields do not compare as bools
class Sample:
    task: str
    context: int        # len(prompt)
    depth: float        # requested depth
    prompt: np.ndarray  # [context] int32: BOS, filler with spans, QUERY k1 k2 IS
    answer: np.ndarray  # [n] int32: answer tokens, END included
    needle_at: int      # index of the target's NEEDLE/VAR token in prompt


@dataclasses.dataclass(frozen=True)
class _Span:
    tokens: tuple[int, ...]
    weights: tuple[float, ...]  # training loss weight of each token as a target

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class _Question:
    key: tuple[int, ...]
    answer: tuple[int, ...]  # END included
    after: int  # index of the last span the query depends on


@dataclasses.dataclass(frozen=True)
class _World:
    spans: tuple[_Span, ...]  # spans[0] is the target; spans[1:1 + n_after] follow it in order
    n_after: int
    questions: tuple[_Question, ...]  # questions[0] is the one an eval prompt asks


@functools.lru_cache(maxsize=1)
def filler_successors() -> np.ndarray:
    """[NUM_FILLER, NUM_FILLER, 3] int32, read-only: [a - FILLER_START, b - FILLER_START] holds
    the possible filler tokens after filler tokens a, b, in SUCCESSOR_PROBS order."""
    scores = np.random.default_rng(LANGUAGE_SEED).random((NUM_FILLER,) * 3)
    table = (np.argsort(scores, axis=-1)[..., :3] + FILLER_START).astype(np.int32)
    table.setflags(write=False)
    return table


def filler(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n] int32 filler tokens: two uniformly random words, then the Markov chain."""
    table = filler_successors()
    words = [int(w) for w in rng.integers(FILLER_START, VOCAB_SIZE, size=min(n, 2))]
    for pick in rng.choice(3, size=max(n - 2, 0), p=SUCCESSOR_PROBS):
        words.append(int(table[words[-2] - FILLER_START, words[-1] - FILLER_START, pick]))
    return np.asarray(words, np.int32)


def _span(opener: int, key: Sequence[int], tail: Sequence[int]) -> _Span:
    """opener key IS tail. Opener, key and a fact's content are unpredictable (weight 0), IS and a
    fact's closing END are not (1); a query's tail is its answer (ANSWER_WEIGHT)."""
    weights = (ANSWER_WEIGHT,) * len(tail) if opener == QUERY else (0.0,) * (len(tail) - 1) + (1.0,)
    return _Span((opener, *key, IS, *tail), (0.0,) * (1 + len(key)) + (1.0, *weights))


def _distinct_symbol_keys(rng: np.random.Generator, n: int) -> list[tuple[int, ...]]:
    """n keys whose 2n KEY symbols are all distinct (an eval prompt's keys)."""
    return [tuple(int(k) for k in row + KEY_START)
            for row in rng.choice(NUM_KEYS, size=(n, KEY_LEN), replace=False)]


def _world(task: str, rng: np.random.Generator, keys: Sequence[tuple[int, ...]]) -> _World:
    """The spans and questions of one task instance; keys: 1 per needle (multikey: its needle
    count), 4 for vartrack; multivalue uses keys[0]."""
    n = {"passkey": 1, "multikey": len(keys), "multivalue": 3}.get(task, 4)
    codes = rng.choice(NUM_VALUES ** VALUE_LEN, size=n, replace=False)  # distinct value groups
    values = [tuple(VALUE_START + int(c) // NUM_VALUES ** i % NUM_VALUES for i in range(VALUE_LEN))
              for c in codes]
    if task in ("passkey", "multikey"):
        return _World(tuple(_span(NEEDLE, k, (*v, END)) for k, v in zip(keys, values)), 0,
                      tuple(_Question(k, (*v, END), i)
                            for i, (k, v) in enumerate(zip(keys, values))))
    if task == "multivalue":
        return _World(tuple(_span(NEEDLE, keys[0], (*v, END)) for v in values), 2,
                      (_Question(keys[0], (*values[0], *values[1], *values[2], END), 2),))
    x1, x2, d1, d2 = keys
    spans = tuple(_span(VAR, k, (*v, END)) for k, v in
                  ((x1, values[0]), (x2, x1), (d1, values[1]), (d2, values[2])))
    return _World(spans, 1, tuple(_Question(k, (*values[v], END), i) for k, v, i in
                                  ((x2, 0, 1), (x1, 0, 0), (d1, 1, 2), (d2, 2, 3))))


def _layout(start: int, length: int, spans: Sequence[_Span], rng: np.random.Generator,
            flush_end: bool = False) -> list[tuple[int, _Span]]:
    """Spans in order in [start, start + length), uniform random gaps; flush_end: last ends it."""
    free = length - sum(len(s) for s in spans)
    assert free >= 0, (length, spans)
    offsets = np.sort(rng.integers(free + 1, size=len(spans)))
    if flush_end:
        offsets[-1] = free
    before = np.cumsum([0] + [len(s) for s in spans[:-1]])
    return [(start + int(o + b), span) for o, b, span in zip(offsets, before, spans)]


def _assemble(length: int, placed: list[tuple[int, _Span]],
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BOS, then the placed spans with filler runs in the gaps -> (tokens, loss weights)."""
    tokens, weights = np.full(length, BOS, np.int32), np.ones(length, np.float32)
    weights[0], cursor = 0.0, 1
    for pos, span in sorted(placed, key=lambda p: p[0]) + [(length, _Span((), ()))]:
        assert pos >= cursor, (pos, cursor)
        tokens[cursor:pos] = filler(pos - cursor, rng)
        weights[cursor:min(cursor + 2, pos)] = 0.0  # a filler run starts with 2 random words
        tokens[pos:pos + len(span)] = span.tokens
        weights[pos:pos + len(span)] = span.weights
        cursor = pos + len(span)
    return tokens, weights


def make_sample(task: str, context: int, depth: float, seed: int) -> Sample:
    """One eval prompt of exactly `context` tokens, target at `depth` (see the module doc)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; pick one of {TASKS}")
    if not 0.0 <= depth <= 1.0:  # also rejects NaN
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    rng = np.random.default_rng([seed, TASKS.index(task)])
    tokens, _, answer, start = _eval_prompt(rng, task, context, depth, answered=False)
    return Sample(task, int(context), float(depth), tokens, answer, start)


def eval_sequence(rng: np.random.Generator, length: int, tasks: Sequence[str] = TASKS,
                  edge_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [length] int32, weights [length] f32): make_sample's prompt of length - len(answer)
    tokens, then its answer. The task is drawn uniformly from `tasks` (repeat one to weight it);
    the depth is uniform in [0, 1], except in an `edge_share` of the rows, where it is 0 (the
    target right after BOS) or 1 (right before the query), half each: a uniform depth almost
    never puts it there. Weights as in training_sequence: ANSWER_WEIGHT on the answer only."""
    task = tasks[int(rng.integers(len(tasks)))]
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; pick from {TASKS}")
    depth = float(rng.random())
    if edge_share > 0.0 and rng.random() < edge_share:
        depth = float(depth < 0.5)
    return _eval_prompt(rng, task, length, depth, answered=True)[:2]


def _eval_prompt(rng: np.random.Generator, task: str, context: int, depth: float, answered: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """An eval prompt's (tokens [context], weights, answer, target start); answered: the query
    span holds the answer too, so the tokens are the prompt of context - len(answer), answered."""
    world = _world(task, rng, _distinct_symbol_keys(rng, _keys_for(task, 4)))
    question = world.questions[0]
    query = _span(QUERY, question.key, question.answer if answered else ())
    target, *after = world.spans[:1 + world.n_after]
    others = world.spans[1 + world.n_after:]
    slack = context - 1 - len(query) - len(target) - sum(len(s) for s in after)
    need = sum(len(s) for s in others) + max((len(s) for s in others), default=0)
    if slack < need:
        raise ValueError(f"context={context} is too small for task {task!r}: needs at least "
                         f"{context - slack + need}; raise context")
    start = 1 + round(depth * slack)
    before, room = [], [start - 1, slack - (start - 1)]
    for span in others:  # a side with probability ~ its free room, if it fits (need ensures)
        side = int(rng.random() * (room[0] + room[1]) >= room[0])
        side = side if room[side] >= len(span) else 1 - side
        room[side] -= len(span)
        group = (before, after)[side]
        group.insert(int(rng.integers(len(group) + 1)), span)
    tail = start + len(target)
    placed = [(start, target), (context - len(query), query), *_layout(1, start - 1, before, rng),
              *_layout(tail, context - len(query) - tail, after, rng)]
    tokens, weights = _assemble(context, placed, rng)
    return tokens, weights, np.asarray(question.answer, np.int32), start


def make_samples(task: str, context: int, depths: Sequence[float], n_per_depth: int,
                 seed: int) -> list[Sample]:
    """n_per_depth samples per depth, depth-major; the k-th uses seed seed * len(depths) *
    n_per_depth + k, so each has its own keys and values (`probe_seed`)."""
    return [make_sample(task, context, depth, probe_seed(seed, len(depths), i, n_per_depth, j))
            for i, depth in enumerate(depths) for j in range(n_per_depth)]


def probe_seed(seed: int, n_depths: int, depth_index: int, n_per_depth: int, j: int) -> int:
    """The seed of sample j at depth number depth_index of a grid (make_samples' numbering)."""
    return (seed * n_depths + depth_index) * n_per_depth + j


def score(generated: Sequence[int], answer: np.ndarray) -> bool:
    """Exact match of the first len(answer) generated tokens (a shorter generation fails)."""
    return len(generated) >= len(answer) and np.array_equal(generated[:len(answer)], answer)


def _keys_for(task: str, n_needles: int) -> int:
    """Keys an eval-style instance draws (multivalue draws 3 and uses the first)."""
    return {"passkey": 1, "multikey": n_needles, "multivalue": 3}.get(task, 4)


@functools.lru_cache(maxsize=None)
def _repeating_minimum(queries: int) -> int:
    """The shortest row that holds any task instance (multikey: 4 needles) and `queries`
    of its longest question."""
    rng = np.random.default_rng(0)
    worlds = [_world(t, rng, _distinct_symbol_keys(rng, _keys_for(t, 4))) for t in TASKS]
    return max(1 + sum(len(s) for s in w.spans)
               + queries * max(len(q.key) + 2 + len(q.answer) for q in w.questions)
               for w in worlds)


def _place(rng: np.random.Generator, length: int, worlds: Sequence[_World],
           asked: Sequence[Sequence[_Question]]) -> tuple[np.ndarray, np.ndarray]:
    """Each world's spans at random times (its target and following spans in order), each of
    its asked questions at a random time after the span it needs; the latest question ends the
    sequence. Returns `_assemble`'s (tokens, weights)."""
    times, spans, query_times, queries = [], [], [], []
    for world, questions in zip(worlds, asked):
        t = rng.random(len(world.spans))
        t[:1 + world.n_after] = np.sort(t[:1 + world.n_after])
        times.extend(t)
        spans.extend(world.spans)
        query_times += [rng.uniform(t[q.after], 1.0) for q in questions]
        queries += [_span(QUERY, q.key, q.answer) for q in questions]
    query_times[int(np.argmax(query_times))] = 1.0
    order = np.argsort(np.concatenate([times, query_times]), kind="stable")
    every = spans + queries
    placed = _layout(1, length - 1, [every[i] for i in order], rng, flush_end=True)
    return _assemble(length, placed, rng)


def _repeating(rng: np.random.Generator, length: int, queries: int):
    """One task instance (multikey: 4-8 needles, fewer if length is short) and `queries`
    questions drawn from its questions with replacement."""
    minimum = _repeating_minimum(queries)
    if length < minimum:
        raise ValueError(f"length={length} is too short for queries={queries}: needs at least "
                         f"{minimum}; raise length or lower queries")
    task = TASKS[int(rng.integers(len(TASKS)))]
    n_needles = min(int(rng.integers(4, 9)), (length - 1) // _FACT_LEN - queries)
    world = _world(task, rng, _distinct_symbol_keys(rng, _keys_for(task, n_needles)))
    picks = [world.questions[int(i)] for i in rng.integers(len(world.questions), size=queries)]
    return [world], [picks]


def _distinct(rng: np.random.Generator, length: int, queries: int):
    """Task instances (passkey, multivalue, vartrack, uniformly while keys last) until `queries`
    questions are asked, each about a different key: an instance's eval question, plus each
    vartrack distractor w.p. 1/3. All keys of the row use distinct KEY symbols, as in an eval
    prompt, so one matching symbol identifies a key (at most MAX_DISTINCT keys)."""
    if queries > MAX_DISTINCT:
        raise ValueError(f"queries={queries} exceeds the {MAX_DISTINCT} symbol-distinct keys a "
                         "row holds; lower queries")
    if length < 1 + _WORST * queries:
        raise ValueError(f"length={length} is too short for queries={queries}: needs at least "
                         f"{1 + _WORST * queries}; raise length or lower queries")
    keys = [tuple(int(k) for k in pair + KEY_START)
            for pair in rng.permutation(NUM_KEYS).reshape(MAX_DISTINCT, KEY_LEN)]
    worlds, asked, n_asked = [], [], 0
    while n_asked < queries:
        # a vartrack instance takes 4 keys for >= 1 question: only if the rest still suffice
        fits = len(keys) - 4 >= queries - n_asked - 1
        options = TRAIN_TASKS if fits else ("passkey", "multivalue")
        task = options[int(rng.integers(len(options)))]
        n = 4 if task == "vartrack" else 1
        world = _world(task, rng, keys[-n:])
        del keys[-n:]
        extra = [q for q in world.questions[1:] if task == "vartrack" and rng.random() < 1 / 3]
        questions = [world.questions[0], *extra][:queries - n_asked]
        worlds.append(world)
        asked.append(questions)
        n_asked += len(questions)
    return worlds, asked


TRAIN_TASKS = ("passkey", "multivalue", "vartrack")  # distinct layout; multikey comes free
MAX_DISTINCT = NUM_KEYS // KEY_LEN  # questions a distinct-layout row can hold
_WORST = max(sum(len(s) for s in w.spans) + 2 + KEY_LEN + len(w.questions[0].answer)
             for w in (_world(t, np.random.default_rng(0), [(KEY_START,) * KEY_LEN] * 4)
                       for t in TRAIN_TASKS))  # tokens one distinct-layout question may bring


def training_sequence(rng: np.random.Generator, length: int, queries: int = 8,
                      distinct: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [length] int32, weights [length] f32): task spans at random places and `queries`
    query+answer spans, each after the spans it asks about, the last ending the sequence.
    Layouts: repeating (default): one task instance, questions drawn with replacement, so most
    answers repeat an earlier one and can be copied; distinct: several instances, every
    question about a different key, as in an eval prompt. The testbed recipe trains on the
    repeating layout first, then on a mix of both (from scratch, the distinct layout alone
    learned no retrieval in 5 H200 minutes). weights[i] weighs
    predicting tokens[i] from tokens[:i]: ANSWER_WEIGHT on answers, 1 on chain-predictable
    filler and IS/END, 0 on BOS, span openers, keys, needle values, filler-run starts."""
    if queries < 1:
        raise ValueError(f"queries={queries} must be >= 1")
    worlds, asked = (_distinct if distinct else _repeating)(rng, length, queries)
    return _place(rng, length, worlds, asked)


_WORDS = ("the", "grass", "is", "green", "sky", "blue", "sun", "warm", "river", "runs", "past",
          "an", "old", "town", "birds", "sing", "at", "dawn", "wind", "moves", "tall", "trees")
_TEXT_KEYS = ("apple", "harbor", "violet", "canyon", "ember", "falcon", "glacier", "meadow")


def text_sample(task: str, context_tokens: int, depth: float, seed: int,
                tokenizer: Any) -> tuple[str, str]:
    """(prompt, answer) texts, the prompt about context_tokens long by tokenizer.encode(str)."""
    if task not in ("passkey", "multikey"):
        raise ValueError(f"task={task!r} has no text form; use 'passkey' or 'multikey'")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    rng = np.random.default_rng([seed, TASKS.index(task)])
    keys = rng.choice(_TEXT_KEYS, size=1 if task == "passkey" else 4, replace=False)
    numbers = rng.integers(1_000_000, 10_000_000, size=len(keys))
    needles = [f"The special magic number for {k} is {v}." for k, v in zip(keys, numbers)]
    question = (f"What is the special magic number for {keys[0]}? "
                f"The special magic number for {keys[0]} is")
    used = len(tokenizer.encode(" ".join([*needles, question])))
    if used > context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is below the {used} tokens the "
                         f"needles and question take; raise context_tokens")
    pool = [" ".join(rng.choice(_WORDS, size=int(rng.integers(5, 12)))).capitalize() + "."
            for _ in range(context_tokens // 5 + 1)]  # a sentence has at least 5 tokens
    empty = len(tokenizer.encode(""))  # e.g. a BOS the tokenizer adds
    costs = np.cumsum([len(tokenizer.encode(" " + s)) - empty for s in pool])
    parts = pool[:int(np.searchsorted(costs, context_tokens - used, side="right"))]
    parts.insert(round(depth * len(parts)), needles[0])
    for needle in needles[1:]:  # distractors, at random sentence boundaries
        parts.insert(int(rng.integers(len(parts) + 1)), needle)
    return " ".join([*parts, question]), f" {numbers[0]}"
