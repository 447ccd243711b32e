"""Runs accuracy experiment configs one after another (the GPU path of `lserve run`, which
needs no CLI library): `python experiments/run_ablations.py experiments/configs/policies.toml
... [--contexts 2048 8192] [--policies dense lserve] [--backend pallas] [--output-dir D]
[--model runs/testbed_stage9]`.
Each writes JSON, markdown and plots into its output_dir."""

from __future__ import annotations

import argparse
import dataclasses

from lserve_jax.config import load_experiment
from lserve_jax.experiment import run_experiment


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="override")
    parser.add_argument("--policies", nargs="+", default=None, help="override")
    parser.add_argument("--backend", default=None, help="override run.backend")
    parser.add_argument("--output-dir", default=None, help="override output_dir")
    parser.add_argument("--model", default=None, help="override model (a name or checkpoint "
                        "directory)")
    args = parser.parse_args()
    for path in args.configs:
        exp = load_experiment(path)
        if args.contexts:
            exp = dataclasses.replace(exp, contexts=tuple(args.contexts))
        if args.policies:
            exp = dataclasses.replace(exp, policies=tuple(args.policies))
        if args.backend:
            exp = dataclasses.replace(exp, run=dataclasses.replace(exp.run, backend=args.backend))
        if args.output_dir:
            exp = dataclasses.replace(exp, output_dir=args.output_dir)
        if args.model:
            exp = dataclasses.replace(exp, model=args.model)
        print(f"== {path}", flush=True)
        run_experiment(exp)


if __name__ == "__main__":
    main()
