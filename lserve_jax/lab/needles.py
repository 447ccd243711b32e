"""Needle-retrieval samples for any text tokenizer: what DuoAttention head identification
trains on for a model of your own (`gates.train_gates(..., source=NeedlePrompts(tokenizer))`).

A sample is exactly `length` tokens: BOS (when the tokenizer has one), filler prose (the
paragraphs of the shipped `assets/filler.txt` in a random order, in a fresh order again as often
as the length needs, cut to fit) with the needles spliced in at sentence boundaries at uniformly
random depths, then a question and its answer, which the answer mask marks. Two kinds, half of
the samples each:
  passkey  "The pass key is 48213. Remember it. 48213 is the pass key."; the question
           "What is the pass key? The pass key is", the answer " 48213".
  word     1 to 3 needles "The special word for Mara is lantern." with distinct names and
           words; the question asks the first: "What is the special word for Mara? The
           special word for Mara is", the answer " lantern".
Pieces are tokenized apart, each after a space, and their ids joined, as DuoAttention splices
needle ids into a tokenized haystack. Every variable piece comes from a fixed list tokenized
up front, so `min_length` bounds what needles, question and answer can take.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

FILLER = pathlib.Path(__file__).parents[1] / "assets" / "filler.txt"
NAMES = ("Mara", "Tobin", "Ilse", "Corwin", "Nadia", "Pavel", "Rhea", "Soren", "Talia", "Ugo",
         "Vera", "Wren")
WORDS = ("lantern", "pebble", "saffron", "harbor", "thimble", "juniper", "anvil", "velvet",
         "compass", "meadow", "cobalt", "quarry")
PASSKEY_SEED, NUM_PASSKEYS = 0, 1000  # five-digit pass keys, drawn from this fixed set
MAX_WORD_NEEDLES = 3


class NeedlePrompts:
    """A gate-training source: `prompts(rng, length)` -> (tokens [length] int32, answer mask
    [length] bool). `tokenizer` is an HF tokenizer (`tokenizer(texts)["input_ids"]`)."""

    def __init__(self, tokenizer):
        def encode(texts: list[str]) -> list[np.ndarray]:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return [np.asarray(row, np.int32) for row in ids]

        self.bos = np.asarray([] if tokenizer.bos_token_id is None else
                              [tokenizer.bos_token_id], np.int32)
        paragraphs = [p for p in FILLER.read_text().split("\n\n") if p.strip()]
        self.filler = [encode([" " + s for s in re.split(r"(?<=\.)\s+", p.strip())])
                       for p in paragraphs]  # [paragraph][sentence]
        keys = np.random.default_rng(PASSKEY_SEED).choice(90_000, NUM_PASSKEYS, replace=False)
        keys = [str(10_000 + k) for k in keys]
        self.passkey_needles = encode([f" The pass key is {k}. Remember it. {k} is the pass key."
                                       for k in keys])
        self.passkey_answers = encode([f" {k}" for k in keys])
        self.passkey_question = encode([" What is the pass key? The pass key is"])[0]
        self.word_needles = [encode([f" The special word for {n} is {w}." for w in WORDS])
                             for n in NAMES]  # [name][word]
        self.word_questions = encode([f" What is the special word for {n}? The special word "
                                      f"for {n} is" for n in NAMES])
        self.word_answers = encode([f" {w}" for w in WORDS])
        passkey = (max(len(n) + len(a) for n, a in zip(self.passkey_needles,
                                                       self.passkey_answers))
                   + len(self.passkey_question))
        longest = sorted((max(map(len, row)) for row in self.word_needles), reverse=True)
        word = (sum(longest[:MAX_WORD_NEEDLES]) + max(map(len, self.word_questions))
                + max(map(len, self.word_answers)))
        # the most tokens BOS, needles, question and answer of a sample can take
        self.min_length = len(self.bos) + max(passkey, word)

    def check_length(self, length: int) -> None:
        if length < self.min_length:
            raise ValueError(f"GateConfig.length={length} is below the {self.min_length} tokens "
                             "that needles, question and answer can take with this tokenizer: "
                             f"raise --length to {self.min_length} or more")

    def __call__(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        self.check_length(length)
        if rng.random() < 0.5:
            key = int(rng.integers(NUM_PASSKEYS))
            needles = [self.passkey_needles[key]]
            question, answer = self.passkey_question, self.passkey_answers[key]
        else:
            count = int(rng.integers(1, MAX_WORD_NEEDLES + 1))
            names = rng.choice(len(NAMES), count, replace=False)
            words = rng.choice(len(WORDS), count, replace=False)
            needles = [self.word_needles[n][w] for n, w in zip(names, words)]
            question, answer = self.word_questions[names[0]], self.word_answers[words[0]]
        room = length - len(self.bos) - sum(map(len, needles)) - len(question) - len(answer)
        filler, bounds = self._filler(rng, room)
        at = np.sort(rng.choice(bounds, len(needles)))
        order = rng.permutation(len(needles))
        parts, start = [self.bos], 0
        for offset, i in zip(at, order):
            parts += [filler[start:offset], needles[i]]
            start = offset
        tokens = np.concatenate([*parts, filler[start:], question, answer])
        mask = np.zeros(length, bool)
        mask[length - len(answer):] = True
        return tokens, mask

    def _filler(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n filler tokens, the offsets where its sentences start and n: where needles may
        go)."""
        pieces = []
        while sum(map(len, pieces)) < n:
            for paragraph in rng.permutation(len(self.filler)):
                pieces += self.filler[paragraph]
        starts = np.cumsum([0] + [len(p) for p in pieces])[:-1]
        tokens = np.concatenate([np.zeros(0, np.int32), *pieces])[:n]
        return tokens, np.append(starts[starts < n], n)
