"""Project checkpoints: `params/` (orbax, in the model's dtype) + `model.json` (the ModelConfig),
optionally with the model's DuoAttention head pattern in `pattern/`."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax.config import ModelConfig, RopeScaling


def save_checkpoint(out_dir: str | pathlib.Path, model_cfg: ModelConfig, params) -> None:
    """Writes `params/` (orbax, cast to the model's dtype) and `model.json`."""
    import orbax.checkpoint as ocp

    out_dir = pathlib.Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    cast = jax.tree.map(lambda p: np.asarray(p.astype(model_cfg.dtype)), params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_dir / "params", cast, force=True)
    (out_dir / "model.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))


def load_checkpoint(path: str | pathlib.Path) -> tuple[ModelConfig, dict]:
    """(config, params) of a directory written by `save_checkpoint`; a missing or corrupt file
    is an error that names it."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    spec = path / "model.json"
    if not spec.exists():
        raise FileNotFoundError(f"{path} holds no checkpoint (model.json + params/)")
    try:
        fields = json.loads(spec.read_text())
        scaling = fields.pop("rope_scaling", None)
        model_cfg = ModelConfig(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{spec} is not a ModelConfig ({err}): restore the checkpoint's "
                         "model.json") from None
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(path / "params")
    except Exception as err:  # orbax raises many kinds: name the directory whatever it is
        raise ValueError(f"{path / 'params'} could not be read as an orbax checkpoint "
                         f"({type(err).__name__}: {err})") from None
    return model_cfg, jax.tree.map(jnp.asarray, params)
