"""Trains the accuracy testbed from scratch: every step of a recipe file, in order
(`lserve_jax.lab.recipe`), then installs the model and its head pattern.

    python experiments/train_testbed.py experiments/configs/testbed_recipe.toml \
        [--from STEP] [--to STEP] [--results experiments/results/<device>/testbed]
"""

from __future__ import annotations

import argparse

from lserve_jax.lab.recipe import load_recipe, run_recipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--from", dest="start", default=None, metavar="STEP",
                        help="start at this step (the earlier steps' outputs must exist)")
    parser.add_argument("--to", dest="stop", default=None, metavar="STEP",
                        help="stop after this step (the rest run later with --from)")
    parser.add_argument("--results", default="runs/testbed/results",
                        help="where each step's history (JSON) and plot (PNG) go")
    args = parser.parse_args(argv)
    try:
        run_recipe(load_recipe(args.recipe), args.results, args.start, args.stop)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
