"""The job of `lserve run CONFIG`: an `ExperimentConfig` (a model, a policy grid, what to
measure), read from TOML with command-line overrides (`lserve_jax.lab.run` runs it)."""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib
from typing import Literal

from lserve_jax.config import (POLICIES, WEIGHT_DTYPES, CacheConfig, Policy, RunConfig,
                               SparsityConfig, WeightDtype, _one_of, _positive, _require,
                               from_dict)
from lserve_jax.lab.tasks import TASKS


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One `lserve run CONFIG` job: a model, a policy grid and what to measure.

    task `generate`: decode random prompts under each policy and report agreement with dense,
    attended tokens and KV bytes per sequence. task `accuracy`: score each policy (x each sweep
    value) on the synthetic retrieval tasks of `lserve_jax.lab.tasks` over contexts x depths.
    task `recall`: on the same prompts, teacher-forced, the share of each retrieval head's dense
    attention at the answer steps that the pages its decode attends to keep (reuse included),
    against the best as many pages, for each policy that selects pages (quest, lserve) x each
    sweep value (`lserve_jax.lab.coverage`): why a setting loses accuracy.
    """

    name: str = "quickstart"
    task: Literal["generate", "accuracy", "recall"] = "generate"
    model: str = "tiny"  # a preset, `testbed`, a checkpoint directory or a local HF directory
    policies: tuple[Policy, ...] = ("dense", "streaming", "quest", "lserve")
    prompt_lengths: tuple[int, ...] = (48, 200, 480)  # generate: random prompts of these lengths
    output_dir: str = "runs"
    # accuracy, recall: task names, prompt lengths (tokens), target depths in [0, 1], prompts
    # per cell
    tasks: tuple[str, ...] = TASKS
    contexts: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4
    # accuracy, recall: a SparsityConfig field to sweep ("" for none) and its values as text;
    # page_size takes "N_P/N_L" (hierarchical pages) or "N" (flat: N_P = N_L = N); accuracy
    # only: "precision" sweeps "WEIGHTS/KV" dtypes ("auto/int8", "fp8/int8": weight_dtype /
    # cache.kv_dtype)
    sweep: str = ""
    sweep_values: tuple[str, ...] = ()
    weight_dtype: WeightDtype = "auto"  # "fp8": the model's linear layers quantized at load
    sparsity: SparsityConfig = SparsityConfig()
    cache: CacheConfig = CacheConfig(max_seq_len=1024, max_batch=4)
    run: RunConfig = RunConfig()

    def __post_init__(self):
        _one_of(self, "task", ("generate", "accuracy", "recall"))
        for policy in self.policies:
            _require(policy in POLICIES, "ExperimentConfig.policies", policy,
                     f"choose from {POLICIES}")
        for name in ("prompt_lengths", "contexts"):
            value = getattr(self, name)
            _require(len(value) > 0 and all(isinstance(n, int) and n > 0 for n in value),
                     f"ExperimentConfig.{name}", value, "give one or more positive lengths")
        _require(len(self.tasks) > 0, "ExperimentConfig.tasks", self.tasks, f"name some of {TASKS}")
        for task in self.tasks:
            _require(task in TASKS, "ExperimentConfig.tasks", task, f"choose from {TASKS}")
        _require(len(self.depths) > 0 and all(0.0 <= d <= 1.0 for d in self.depths),
                 "ExperimentConfig.depths", self.depths, "give one or more depths in [0, 1]")
        _positive(self, "samples")
        values = tuple(str(v).lower() if isinstance(v, bool) else str(v)
                       for v in self.sweep_values)  # TOML numbers and booleans become text
        object.__setattr__(self, "sweep_values", values)
        knobs = tuple(f.name for f in dataclasses.fields(SparsityConfig) if f.name != "policy")
        _require(self.sweep in ("", "precision", *knobs), "ExperimentConfig.sweep", self.sweep,
                 "leave it empty, say 'precision' or name a SparsityConfig field: one of "
                 f"{knobs} (policies are listed in ExperimentConfig.policies)")
        _one_of(self, "weight_dtype", WEIGHT_DTYPES)
        _require(bool(values) == bool(self.sweep), "ExperimentConfig.sweep_values", values,
                 "give one or more values when sweep is set, and none when it is not")
        if self.task == "recall":
            _require(any(self.sparsity.for_policy(p).dynamic for p in self.policies),
                     "ExperimentConfig.policies", self.policies,
                     "task 'recall' measures page selection: include 'quest' or 'lserve'")
            _require(self.sweep != "precision", "ExperimentConfig.sweep", self.sweep,
                     "task 'recall' sweeps SparsityConfig fields only (for other weights set "
                     "weight_dtype)")




def load_experiment(path: str | pathlib.Path) -> ExperimentConfig:
    """Reads a TOML experiment file (top-level fields plus [sparsity], [cache], [run] tables)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"experiment config {path} does not exist "
                                "(see experiments/configs)")
    with path.open("rb") as f:
        data = tomllib.load(f)
    try:
        return from_dict(ExperimentConfig, data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
