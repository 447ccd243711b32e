"""Llama model: Flax modules (llama.py), HF loading (hf.py), and `load_model` by name or path."""

from __future__ import annotations

import pathlib

import jax

from lserve_jax.config import MODEL_PRESETS, ModelConfig

# project-trained models, loaded by name (orbax checkpoints committed under lserve_jax/assets)
CHECKPOINTS = {"testbed": pathlib.Path(__file__).parent.parent / "assets" / "testbed"}


def load_model(name: str, seed: int = 0):
    """(config, params, tokenizer or None) for a project checkpoint name (`testbed`), a preset
    name (random weights from `seed`), a checkpoint directory written by
    `lserve_jax.train.save_checkpoint` (model.json + params/) or a local HF directory."""
    from lserve_jax.model.hf import load_hf_params, load_tokenizer
    from lserve_jax.model.llama import init_params

    if name in CHECKPOINTS:
        from lserve_jax.train import load_checkpoint

        return *load_checkpoint(CHECKPOINTS[name]), None
    if name in MODEL_PRESETS:
        cfg = ModelConfig.from_name(name)
        return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed)), None
    path = pathlib.Path(name)
    if not path.is_dir():
        raise ValueError(f"model={name!r} is neither a preset {sorted(MODEL_PRESETS)}, a "
                         f"checkpoint name {sorted(CHECKPOINTS)} nor a directory holding a "
                         "checkpoint (model.json + params/, or HF config.json + safetensors)")
    if (path / "model.json").exists():
        from lserve_jax.train import load_checkpoint

        return *load_checkpoint(path), None
    cfg, params = load_hf_params(path)
    return cfg, params, load_tokenizer(path)
