"""Runs accuracy configs on one GPU as many processes side by side, then merges each config's
parts into its own JSON, table and plots (the GPU path's `ablations` step):
`python experiments/run_parallel.py experiments/configs/policies.toml ... [--memory 8192=0.29
4096=0.11] [--procs 7] [--minutes 9] [--work runs/parallel]`.

Each config runs as two parts, its largest context and the rest, each a `run_ablations.py`
process with XLA_PYTHON_CLIENT_MEM_FRACTION set to its share of the GPU; parts start in order
while the shares in use stay within --budget and fewer than --procs run, a part that does not
fit letting later ones start. The grids are host-bound (prompt building, dispatch, compiles),
so processes side by side finish sooner than one. On one H200 (session 14): this split ran the
eleven 4-prompt configs, streaming and Quest of policies_n20, budget_n20 and the gates in 7.4
minutes (three whole configs at a time took 11.5 in session 12); one part per context ran
slower (33 of 37 parts in 9.5 minutes: the many short parts kept the memory the long ones
waited for). A part that fails or is cut off leaves its config unmerged (its log says why);
parts that succeeded stay under --work for a later merge (`merge_ablations.py`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

from lserve_jax.config import load_experiment

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from merge_ablations import merge  # noqa: E402

RUNNER = pathlib.Path(__file__).parent / "run_ablations.py"
# an 8K prefill of the testbed on the reference backend allocates a 16 GiB logits buffer per
# wave of 8 prompts: 0.22 of an H200 ran out of memory, 0.29 did not; 4K needs a quarter of it
MEMORY = {8192: 0.29, 4096: 0.11}


@dataclasses.dataclass(frozen=True)
class Part:
    config: str
    name: str
    contexts: tuple[int, ...]
    memory: float
    out: pathlib.Path


def plan(configs: list[str], memory: dict[int, float], work: pathlib.Path) -> list[Part]:
    """Two parts per config, in config order: its largest context alone, then its other
    contexts in one process (the long part starts early and the short ones fill the memory
    beside it); each part gets the share of the smallest --memory context at or above its
    largest context."""
    parts = []
    for path in configs:
        exp = load_experiment(path)
        top, *rest = sorted(exp.contexts, reverse=True)
        for contexts in ((top,), tuple(sorted(rest))):
            if not contexts:
                continue
            fits = [c for c in memory if c >= contexts[-1]]
            if not fits:
                raise ValueError(f"{path}: context {contexts[-1]} is above every --memory "
                                 f"context {sorted(memory)}; add --memory {contexts[-1]}=FRACTION")
            label = str(top) if contexts == (top,) else f"below{top}"
            parts.append(Part(path, exp.name, contexts, memory[min(fits)],
                              work / f"{exp.name}_{label}"))
    if len({p.out for p in parts}) != len(parts):
        raise ValueError("two configs share a name; give each config its own name")
    return parts


def run(parts: list[Part], budget: float, procs: int, seconds: float,
        command=None) -> dict[str, int]:
    """Runs the parts under the memory budget and process cap until each has ended or the time
    is up (a running part is cut off then); returns each part's exit status by its out dir
    (124: cut off; parts never started are absent)."""
    if too_big := [p.out.name for p in parts if p.memory > budget]:
        raise ValueError(f"parts {too_big} need more than the budget {budget}: raise --budget "
                         "or lower their --memory share")
    command = command or (lambda p: [sys.executable, str(RUNNER), p.config, "--contexts",
                                     *map(str, p.contexts), "--output-dir", str(p.out)])
    start, waiting, running, status = time.time(), list(parts), {}, {}
    while waiting or running:
        for part, proc in list(running.items()):
            if proc.poll() is not None:
                status[str(part.out)] = proc.returncode
                del running[part]
                print(f"{time.time() - start:5.0f}s {part.out.name}: exit {proc.returncode}",
                      flush=True)
        left = seconds - (time.time() - start)
        for part in list(waiting):
            used = sum(p.memory for p in running)
            if used + part.memory > budget + 1e-9 or len(running) >= procs or left < 1:
                continue
            part.out.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=str(part.memory))
            with open(f"{part.out}.log", "w") as log:  # the child keeps its own copy
                running[part] = subprocess.Popen(["timeout", str(int(left)), *command(part)],
                                                 stdout=log, stderr=subprocess.STDOUT, env=env)
            waiting.remove(part)
        if left < 1 and not running:
            break
        time.sleep(0.5)
    for part in waiting:
        print(f"not started (time up): {part.out.name}")
    return status


def merge_configs(parts: list[Part], status: dict[str, int], note: str) -> list[str]:
    """Merges every config whose parts all succeeded; returns the configs left unmerged."""
    left = []
    for config in dict.fromkeys(p.config for p in parts):
        mine = [p for p in parts if p.config == config]
        if any(status.get(str(p.out)) != 0 for p in mine):
            left.append(config)
            continue
        exp = load_experiment(config)
        loaded = [json.loads((p.out / f"{p.name}.json").read_text()) for p in mine]
        merge(exp, loaded, note, exp.output_dir)
    return left


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--memory", nargs="+", default=[f"{c}={f}" for c, f in MEMORY.items()],
                        help="CONTEXT=FRACTION: the GPU share of a part up to that context")
    parser.add_argument("--budget", type=float, default=0.93, help="sum of shares running")
    parser.add_argument("--procs", type=int, default=7, help="most parts running at once")
    parser.add_argument("--minutes", type=float, default=9.0, help="then running parts stop")
    parser.add_argument("--work", default="runs/parallel", help="parts' results and logs")
    args = parser.parse_args()
    memory = {}
    for item in args.memory:
        context, _, fraction = item.partition("=")
        if not (context.isdigit() and fraction):
            raise SystemExit(f"--memory {item!r}: write CONTEXT=FRACTION, e.g. 8192=0.29")
        memory[int(context)] = float(fraction)
    parts = plan(args.configs, memory, pathlib.Path(args.work))
    status = run(parts, args.budget, args.procs, 60 * args.minutes)
    note = (f"run_parallel.py: the largest context and the others as two processes, up to "
            f"{args.procs} side by side within {args.budget} of the device's memory")
    left = merge_configs(parts, status, note)
    if left:
        raise SystemExit(f"not merged (a part failed, was cut off or never started; logs under "
                         f"{args.work}): {' '.join(left)}")


if __name__ == "__main__":
    main()
