"""DuoAttention head patterns: read and write `full_attention_heads.tsv` + `config.json`.

The TSV has one row per layer and one tab-separated gate value per KV head (roughly in [0, 1];
tiny negatives from training are clipped). `config.json` carries at least `sink_size` and
`recent_size`, the streaming window the gates were trained for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from lserve_jax.config import ModelConfig, SparsityConfig, random_gates_seed

TSV = "full_attention_heads.tsv"
TOLERANCE = 0.05  # gates outside [-0.05, 1.05] are not DuoAttention gates


@dataclasses.dataclass(frozen=True)
class HeadPattern:
    gates: np.ndarray  # [L, K] float64, clipped to [0, 1]
    sink_size: int
    recent_size: int


def _tsv_path(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    file = path / TSV if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"head pattern {file} does not exist: pass a DuoAttention "
                                f"pattern directory holding {TSV}")
    return file


def load_gates(path: str | pathlib.Path) -> np.ndarray:
    """[L, K] gates from a pattern directory or TSV file; every malformed line is reported."""
    file = _tsv_path(path)
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(x) for x in line.strip().split("\t")]
        except ValueError:
            raise ValueError(f"{file}:{number}: not tab-separated numbers: {line[:60]!r}") from None
        bad = [v for v in values if not math.isfinite(v) or not -TOLERANCE <= v <= 1 + TOLERANCE]
        if bad:
            raise ValueError(f"{file}:{number}: gate {bad[0]} is outside [0, 1] (or not finite)")
        if rows and len(values) != len(rows[0]):
            raise ValueError(f"{file}:{number}: {len(values)} heads, but line 1 has "
                             f"{len(rows[0])}: every layer needs one gate per KV head")
        rows.append(values)
    if not rows:
        raise ValueError(f"{file} holds no gates")
    return np.clip(np.asarray(rows, np.float64), 0.0, 1.0)


def load_pattern(path: str | pathlib.Path) -> HeadPattern:
    file = _tsv_path(path)
    config = file.parent / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing: a pattern directory needs the config.json "
                                "with sink_size and recent_size")
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{config} must hold a JSON object with sink_size and recent_size")
    for key in ("sink_size", "recent_size"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise ValueError(f"{config}: {key}={meta.get(key)!r} must be an integer >= 0")
    return HeadPattern(load_gates(file), meta["sink_size"], meta["recent_size"])


def save_pattern(directory: str | pathlib.Path, gates: np.ndarray, *, sink_size: int,
                 recent_size: int, **extra) -> pathlib.Path:
    """Writes DuoAttention's format; `extra` fields go into config.json beside the window."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(f"{float(g):.18e}" for g in row) for row in np.asarray(gates)]
    (directory / TSV).write_text("\n".join(lines) + "\n")
    meta = {**extra, "sink_size": int(sink_size), "recent_size": int(recent_size)}
    (directory / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def policy_gates(sparsity: SparsityConfig, model: ModelConfig,
                 own_pattern: str | pathlib.Path | None = None) -> np.ndarray | None:
    """[L, K] gates a policy splits heads by, or None for a policy that does not (dense,
    streaming, quest). `sparsity.head_pattern` names a pattern directory, or "random:SEED" for
    seeded uniform random gates (the randomly-chosen-heads ablation); unset, the model's own
    pattern (`own_pattern`, e.g. the testbed's) is used. A policy that splits heads with
    neither is an error: random heads would silently give wrong answers."""
    if not sparsity.static:
        return None
    pattern = sparsity.head_pattern or own_pattern
    if pattern is None:
        raise ValueError(
            f"policy {sparsity.policy!r} streams the heads a DuoAttention pattern marks, but "
            "sparsity.head_pattern is unset and this model has no pattern of its own: set "
            "sparsity.head_pattern (--sparsity.head-pattern DIR) to a pattern directory "
            f"({TSV} + config.json: DuoAttention's released patterns, or one identified for "
            "your model by `lserve identify-heads MODEL_DIR --out DIR`), or to 'random:SEED' "
            "for randomly chosen heads (an ablation baseline, not for real use)")
    seed = random_gates_seed(str(pattern), "sparsity.head_pattern")
    if seed is not None:
        return np.random.default_rng(seed).random((model.n_layers, model.n_kv_heads))
    return load_gates(pattern)
