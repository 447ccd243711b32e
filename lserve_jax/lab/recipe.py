"""The testbed recipe: one TOML file lists the steps that make the committed testbed, run in
order by one command (`python experiments/train_testbed.py CONFIG`).

A step is a training run (`TrainConfig` fields; the file's `[train]` table holds the fields
every training step shares) or, with a `gates` table, DuoAttention gate training on the model
trained so far (`GateConfig` fields), which writes a head pattern. Each training step continues
from the previous one (the first starts from random weights); its `stream_pattern` names an
earlier gates step. Every step writes `<work_dir>/<name>` (a checkpoint or a pattern) and its
history and plot under the results directory; once the last step is done, the last model and
the last pattern are copied to `checkpoint` (and `checkpoint/pattern`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tomllib

from lserve_jax.config import ModelConfig, from_dict
from lserve_jax.lab.gates import GateConfig, train_gates
from lserve_jax.lab.plots import plot_gates, plot_history
from lserve_jax.lab.report import provenance
from lserve_jax.lab.train import TrainConfig, train
from lserve_jax.model.checkpoint import load_checkpoint, save_checkpoint
from lserve_jax.sparsity.heads import save_pattern


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    train: TrainConfig | None = None  # a training step, or
    gates: GateConfig | None = None  # a gates step on the model trained before it


@dataclasses.dataclass(frozen=True)
class Recipe:
    checkpoint: str  # where the finished model (and `pattern/`) go
    work_dir: str  # every step's checkpoint or pattern: <work_dir>/<name>
    steps: tuple[Step, ...]

    def output(self, name: str) -> pathlib.Path:
        return pathlib.Path(self.work_dir) / name


def load_recipe(path: str | pathlib.Path) -> Recipe:
    """Reads and checks a recipe file; an error names the step and the field."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist (see experiments/configs)")
    with path.open("rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - {"checkpoint", "work_dir", "train", "step"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}: a recipe has checkpoint, "
                         "work_dir, [train] and [[step]] entries")
    work_dir = data.get("work_dir", "runs/testbed")
    shared, steps, previous, patterns = data.get("train", {}), [], "", set()
    for i, entry in enumerate(data.get("step", [])):
        entry = dict(entry)
        name = entry.pop("name", None)
        where = f"{path}: step {i} ({name or 'unnamed'})"
        if not name or name in {s.name for s in steps}:
            raise ValueError(f"{where}: every step needs a unique `name`")
        if "gates" in entry:
            if set(entry) != {"gates"}:
                raise ValueError(f"{where}: a gates step holds only `name` and `gates`")
            if not previous:
                raise ValueError(f"{where}: a gates step needs a training step before it")
            steps.append(Step(name, gates=_build(GateConfig, entry["gates"], where)))
            patterns.add(name)
            continue
        fields = {**shared, **entry, "init_from": previous,
                  "out_dir": str(pathlib.Path(work_dir) / name)}
        if fields.get("stream_pattern"):
            if fields["stream_pattern"] not in patterns:
                raise ValueError(f"{where}: stream_pattern={fields['stream_pattern']!r} must name "
                                 f"an earlier gates step (one of {sorted(patterns)})")
            fields["stream_pattern"] = str(pathlib.Path(work_dir) / fields["stream_pattern"])
        steps.append(Step(name, train=_build(TrainConfig, fields, where)))
        previous = fields["out_dir"]
    if not previous:
        raise ValueError(f"{path}: a recipe needs at least one training step ([[step]] tables)")
    return Recipe(data.get("checkpoint", "lserve_jax/assets/testbed"), work_dir, tuple(steps))


def _build(cls, fields: dict, where: str):
    try:
        return from_dict(cls, fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def run_recipe(recipe: Recipe, results: str | pathlib.Path, start: str | None = None,
               stop: str | None = None) -> None:
    """Runs the steps from `start` through `stop` (default: the first through the last); the
    outputs of the steps before `start` must exist. A run through the last step installs the
    last model and pattern at recipe.checkpoint."""
    names = [s.name for s in recipe.steps]
    for flag, name in (("--from", start), ("--to", stop)):
        if name is not None and name not in names:
            raise ValueError(f"{flag} {name!r} names no step: choose one of {names}")
    results = pathlib.Path(results)
    results.mkdir(parents=True, exist_ok=True)
    first = names.index(start) if start else 0
    last = names.index(stop) if stop else len(names) - 1
    if last < first:
        raise ValueError(f"--to {stop!r} comes before --from {start!r}")
    model = _model_before(recipe, first)
    for step in recipe.steps[first:last + 1]:
        print(f"step {step.name}")
        if step.train:
            _train_step(step, results)
            model = step.train.out_dir
        else:
            _gates_step(recipe, step, model, results)
    if last < len(names) - 1:
        return
    last_train = [s for s in recipe.steps if s.train][-1]
    last_gates = [s for s in recipe.steps if s.gates]
    target = pathlib.Path(recipe.checkpoint)
    shutil.copytree(last_train.train.out_dir, target, dirs_exist_ok=True)
    if last_gates:
        shutil.copytree(recipe.output(last_gates[-1].name), target / "pattern",
                        dirs_exist_ok=True)
    print(f"testbed installed in {target}")


def _model_before(recipe: Recipe, index: int) -> str:
    """The checkpoint the model at step `index` starts from ("" before the first)."""
    trained = [s.train.out_dir for s in recipe.steps[:index] if s.train]
    return trained[-1] if trained else ""


def _train_step(step: Step, results: pathlib.Path) -> None:
    cfg = step.train
    params, history = train(cfg)
    save_checkpoint(cfg.out_dir, ModelConfig.from_name(cfg.model), params)
    (results / f"train_{step.name}.json").write_text(json.dumps(
        {**provenance(), "config": dataclasses.asdict(cfg), "history": history}, indent=1) + "\n")
    plot_history(history, results / f"train_{step.name}.png", f"testbed recipe: {step.name}")


def _gates_step(recipe: Recipe, step: Step, model: str, results: pathlib.Path) -> None:
    cfg = step.gates
    model_cfg, params = load_checkpoint(model)
    gates, history = train_gates(model_cfg, params, cfg)
    save_pattern(recipe.output(step.name), gates, sink_size=cfg.sink, recent_size=cfg.local,
                 model=model, gate_training=dataclasses.asdict(cfg))
    (results / f"{step.name}.json").write_text(json.dumps(
        {**provenance(), "model": model, "config": dataclasses.asdict(cfg),
         "gates": gates.tolist(), "history": history}, indent=1) + "\n")
    plot_gates(gates, results / f"{step.name}.png")
