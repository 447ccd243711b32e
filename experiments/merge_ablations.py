"""Merges the JSONs of one accuracy config run in parts (contexts or policies in separate
processes, as `run_parallel.py` runs them on one GPU) into the config's own JSON, markdown table
and plots:
`python experiments/merge_ablations.py experiments/configs/policies_n20.toml PART.json ...
[--note "how the parts ran"] [--output-dir D]`.
The merged file keeps the first part's device, jax version and date, and names its parts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from lserve_jax.config import ExperimentConfig, load_experiment
from lserve_jax.eval.ablation import write_accuracy

PROVENANCE = ("device", "platform", "jax_version", "date")


def merge(exp: ExperimentConfig, parts: list[dict], note: str,
          out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes exp's result files under out_dir from the rows of `parts` (loaded part JSONs of
    exp). Rows are ordered as one process would write them; a (policy, variant, context, task,
    depth) cell present in two parts is an error, as is a part of another config or model."""
    for part in parts:
        for field in ("name", "model"):
            if part["config"][field] != getattr(exp, field):
                raise ValueError(f"part of {part['config']['name']!r} on "
                                 f"{part['config']['model']!r}: the {field} differs from "
                                 f"{getattr(exp, field)!r}; merge parts of one config only")
    rows = [row for part in parts for row in part["rows"]]
    present = {row["policy"] for row in rows}
    named = dict.fromkeys([*exp.policies,
                           *(p for part in parts for p in part["config"]["policies"])])
    exp = dataclasses.replace(exp, policies=tuple(p for p in named if p in present),
                              contexts=tuple(sorted({row["context"] for row in rows})))
    rank = {key: {v: i for i, v in enumerate(values)} for key, values in (
        ("policy", exp.policies), ("variant", exp.sweep_values or ("-",)),
        ("context", exp.contexts), ("task", exp.tasks), ("depth", exp.depths))}
    order = lambda row: tuple(rank[key][row[key]] for key in rank)  # noqa: E731
    rows.sort(key=order)
    seen = [order(row) for row in rows]
    if len(set(seen)) != len(seen):
        raise ValueError("two parts measured the same cell; pass each cell's part once")
    head = {key: parts[0][key] for key in PROVENANCE if key in parts[0]}
    return write_accuracy(exp, rows, out_dir, **head, merged_from=note)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("parts", nargs="+", help="part JSONs of this config")
    parser.add_argument("--note", default="parts run as separate processes on one device")
    parser.add_argument("--output-dir", default=None, help="default: the config's output_dir")
    args = parser.parse_args()
    exp = load_experiment(args.config)
    parts = [json.loads(pathlib.Path(p).read_text()) for p in args.parts]
    merge(exp, parts, args.note, args.output_dir or exp.output_dir)


if __name__ == "__main__":
    main()
