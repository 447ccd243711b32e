"""Shows the prompts one policy misses in one cell of an accuracy config and what it answered
instead: for each 4-token value group of the answer and of the generation, the position of the
prompt's fact (needle or assignment) that holds it, so a wrong answer reads as "copied the
distractor at 5,120" or "copied nothing":

    python experiments/inspect_misses.py experiments/configs/policies_n20.toml --policy dense \
        --task vartrack --context 8192 --depth 0.25 [--seed 1] [--model DIR]

The prompts are the config's own (`tasks.probe_seed` numbering; --seed overrides run.seed), run
under its sparsity before any sweep."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from lserve_jax.lab.ablation import cell_samples, policy_engine
from lserve_jax.lab.experiment import load_experiment
from lserve_jax.lab.tasks import END, IS, NEEDLE, VALUE_LEN, VAR, Sample, score
from lserve_jax.model import load_model


def facts(prompt: np.ndarray) -> list[tuple[int, tuple[int, ...]]]:
    """(position, value tokens) of every needle and assignment: NEEDLE|VAR k1 k2 IS value END."""
    found = []
    for at in np.flatnonzero((prompt == NEEDLE) | (prompt == VAR)):
        ends = np.flatnonzero(prompt[at + 4:] == END)
        if at + 3 < len(prompt) and prompt[at + 3] == IS and len(ends):
            found.append((int(at), tuple(int(t) for t in prompt[at + 4:at + 4 + ends[0]])))
    return found


def locate(tokens, prompt: np.ndarray) -> str:
    """The tokens before END as value groups, each with the positions of the facts holding it
    ("?": none; a short last group is shown as is)."""
    tokens = [int(t) for t in tokens]
    tokens = tokens[:tokens.index(END)] if END in tokens else tokens
    held = facts(prompt)
    groups = []
    for i in range(0, len(tokens), VALUE_LEN):
        group = tuple(tokens[i:i + VALUE_LEN])
        at = [pos for pos, value in held if any(value[j:j + VALUE_LEN] == group
                                                for j in range(0, len(value), VALUE_LEN))]
        groups.append(f"{list(group)}@{','.join(map(str, at)) or '?'}")
    return " ".join(groups) or "(nothing)"


def explain(sample: Sample, generated) -> str | None:
    """None for a right answer, else the answer and the generation located in the prompt."""
    if score(list(generated), sample.answer):
        return None
    return (f"answer {locate(sample.answer, sample.prompt)} | got "
            f"{locate(generated, sample.prompt)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--policy", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--depth", type=float, required=True)
    parser.add_argument("--seed", type=int, default=None, help="override run.seed")
    parser.add_argument("--model", default=None, help="override model")
    args = parser.parse_args()
    exp = load_experiment(args.config)
    if args.seed is not None:
        exp = dataclasses.replace(exp, run=dataclasses.replace(exp.run, seed=args.seed))
    if args.depth not in exp.depths:
        raise SystemExit(f"--depth {args.depth}: the config's depths are {list(exp.depths)}")
    samples = cell_samples(args.task, args.context, exp.depths.index(args.depth), exp)
    model = load_model(args.model or exp.model, exp.run.seed)
    engine, params = policy_engine(exp, model, exp.sparsity.for_policy(args.policy),
                                args.context, max(len(s.answer) for s in samples), (END,))
    done = engine.generate([s.prompt.tolist() for s in samples], params)
    misses = 0
    for j, (sample, completion) in enumerate(zip(samples, done)):
        if (why := explain(sample, completion.token_ids)) is not None:
            misses += 1
            print(f"prompt {j} (target at {sample.needle_at}): {why}")
    print(f"{args.policy} {args.task} {args.context} depth {args.depth} seed {exp.run.seed}: "
          f"{len(samples) - misses} of {len(samples)} right")


if __name__ == "__main__":
    main()
