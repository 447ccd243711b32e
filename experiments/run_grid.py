"""Runs an accuracy config's sweep values as concurrent processes on one device and merges
their rows into one result (JSON, tables, heatmaps), as `lserve run CONFIG` would write it.

The testbed is small: one process leaves the GPU mostly idle, so each sweep value runs as its
own `lserve run` with a share of the device's memory. A part cut off by `--minutes` keeps the
cells it finished (its partial JSON); the merged file says which parts were partial.

    python experiments/run_grid.py experiments/configs/precision_n20.toml \
        --output-dir experiments/results/h100/accuracy [--minutes 9] [--memory-fraction 0.12] \
        [--only VALUE ...] [--run.backend pallas ...]
    (other flags go to every part, as `lserve run` takes them; `--only` runs some of the
    config's sweep values, e.g. to rerun parts that failed)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import tyro

from lserve_jax.lab.ablation import write_accuracy
from lserve_jax.lab.experiment import ExperimentConfig, load_experiment


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--minutes", type=float, default=60.0, help="stop the parts after this")
    parser.add_argument("--memory-fraction", type=float, default=0.12,
                        help="XLA_PYTHON_CLIENT_MEM_FRACTION of each part")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run these of the config's sweep values (default: all)")
    args, overrides = parser.parse_known_args(argv)  # the rest: ExperimentConfig flags
    exp = tyro.cli(ExperimentConfig, default=load_experiment(args.config), args=overrides,
                   prog=f"run_grid.py {args.config}")  # as each part reads them
    if not exp.sweep_values:
        raise SystemExit(f"{args.config} sweeps nothing: run it with `lserve run`")
    unknown = sorted(set(args.only or ()) - set(exp.sweep_values))
    if unknown:
        raise SystemExit(f"--only {unknown}: not among {args.config}'s sweep values "
                         f"{list(exp.sweep_values)}")
    values = [v for v in exp.sweep_values if args.only is None or v in args.only]
    out = pathlib.Path(args.output_dir)
    parts_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{exp.name}_parts_"))
    print("parts and their logs:", parts_dir, flush=True)
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": str(args.memory_fraction)}
    procs = []
    for value in values:
        name = f"{exp.name}_part{exp.sweep_values.index(value)}"
        cmd = [sys.executable, "-m", "lserve_jax.cli", "run", args.config, "--name", name,
               "--output-dir", str(parts_dir), "--sweep-values", value, *overrides]
        with open(parts_dir / f"{name}.log", "w") as log:
            procs.append((name, subprocess.Popen(cmd, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT)))
    deadline = time.monotonic() + 60 * args.minutes
    while any(p.poll() is None for _, p in procs) and time.monotonic() < deadline:
        time.sleep(5)
    rows, partial = [], []
    for name, proc in procs:
        if proc.poll() is None:
            proc.kill()
            partial.append(name)
        path = parts_dir / f"{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
            rows += record["rows"]
            if "partial" in record:
                partial.append(f"{name}: {record['partial']}")
        else:
            partial.append(f"{name}: no rows")
    if not rows:
        raise SystemExit("no part wrote a row")
    notes = (f"{len(procs)} sweep values run as concurrent processes "
             f"(experiments/run_grid.py, {args.memory_fraction} of the device's memory each)")
    extra = {"notes": notes, **({"partial": partial} if partial else {})}
    ran = tuple(v for v in exp.sweep_values if any(r["variant"] == v for r in rows))
    for path in write_accuracy(dataclasses.replace(exp, sweep_values=ran), rows, out, **extra):
        print("wrote", path)


if __name__ == "__main__":
    main()
