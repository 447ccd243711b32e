"""Llama model: Flax modules (llama.py), HF and checkpoint loading, and `load_model` by name or
path."""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from lserve_jax.config import MODEL_PRESETS, WEIGHT_DTYPES, ModelConfig, WeightDtype

ASSETS = pathlib.Path(__file__).parent.parent / "assets"
# project-trained models, loaded by name (orbax checkpoint + DuoAttention pattern)
CHECKPOINTS = {"testbed": ASSETS / "testbed"}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: dict
    tokenizer: object | None = None  # an HF tokenizer, when the directory has one
    pattern: pathlib.Path | None = None  # the model's own DuoAttention head pattern, if any


def load_model(name: str, seed: int = 0, weight_dtype: WeightDtype = "auto") -> LoadedModel:
    """A project checkpoint name (`testbed`), a preset name (random weights from `seed`), a
    checkpoint directory (model.json + params/, as `save_checkpoint` writes) or a local HF
    directory (config.json + safetensors). A `pattern/` directory beside a checkpoint is its
    DuoAttention head pattern. `weight_dtype="fp8"` quantizes the linear layers at load
    (`lserve_jax.model.quant`)."""
    model = _load(name, seed)
    if weight_dtype == "auto":
        return model
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r} is invalid: choose one of "
                         f"{WEIGHT_DTYPES} ('auto': the checkpoint's dtype)")
    from lserve_jax.model.quant import quantize_params

    return dataclasses.replace(model, **dict(zip(("config", "params"), quantize_params(
        model.config, model.params))))


def _load(name: str, seed: int) -> LoadedModel:
    from lserve_jax.model.checkpoint import load_checkpoint
    from lserve_jax.model.hf import load_hf_params, load_tokenizer
    from lserve_jax.model.llama import init_params

    if name in MODEL_PRESETS and name not in CHECKPOINTS:
        cfg = ModelConfig.from_name(name)
        return LoadedModel(cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed)))
    path = CHECKPOINTS.get(name, pathlib.Path(name))
    if not path.is_dir():
        raise ValueError(f"model={name!r} is neither a preset {sorted(MODEL_PRESETS)}, a "
                         f"checkpoint name {sorted(CHECKPOINTS)} nor a directory holding a "
                         "checkpoint (model.json + params/, or HF config.json + safetensors)")
    pattern = path / "pattern" if (path / "pattern").is_dir() else None
    if (path / "model.json").exists():
        return LoadedModel(*load_checkpoint(path), pattern=pattern)
    cfg, params = load_hf_params(path)
    return LoadedModel(cfg, params, load_tokenizer(path), pattern)
