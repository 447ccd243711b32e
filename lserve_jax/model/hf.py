"""Loads a local Hugging Face Llama directory (config.json + one or many safetensors) into params.

Every tensor is checked by name and shape against the config; a missing, unexpected or
misshapen tensor, and a corrupt or truncated file, raises an error that names it. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from lserve_jax.config import DType, ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """HF name (per layer) -> (our param path, HF shape)."""
    d, f, n, k, h = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {
        "self_attn.q_proj.weight": (("attn", "q"), (n * h, d)),
        "self_attn.k_proj.weight": (("attn", "k"), (k * h, d)),
        "self_attn.v_proj.weight": (("attn", "v"), (k * h, d)),
        "self_attn.o_proj.weight": (("attn", "o"), (d, n * h)),
        "mlp.gate_proj.weight": (("mlp", "gate"), (f, d)),
        "mlp.up_proj.weight": (("mlp", "up"), (f, d)),
        "mlp.down_proj.weight": (("mlp", "down"), (d, f)),
        "input_layernorm.weight": (("attn_norm", "weight"), (d,)),
        "post_attention_layernorm.weight": (("mlp_norm", "weight"), (d,)),
    }


def _to_ours(name: str, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """HF [out, in] linear weights to our einsum layouts."""
    h = cfg.head_dim
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return x.reshape(-1, h, cfg.dim).transpose(2, 0, 1)  # [D, N, H]
    if name.endswith("o_proj.weight"):
        return x.reshape(cfg.dim, cfg.n_heads, h).transpose(1, 2, 0)  # [N, H, D]
    if name.endswith("proj.weight"):
        return x.T
    return x


def _shards(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a "
                             f"'weight_map'): {type(err).__name__}: {err}") from None
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists {missing[0]}, which is not in {directory}")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}: pass an HF model directory")
    return files


def _read_shard(shard: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file; a corrupt or truncated file is a ValueError that
    names it."""
    try:
        with safe_open(str(shard), framework="flax") as f:
            return {name: np.asarray(f.get_tensor(name)) for name in f.keys()
                    if not name.endswith(_IGNORED_SUFFIXES)}
    except Exception as err:  # safetensors raises its own error types: name the file
        raise ValueError(f"{shard} could not be read as safetensors ({type(err).__name__}: "
                         f"{err}): the file is corrupt or truncated; download it again") from None


def load_hf_params(path: str | pathlib.Path, dtype: DType | None = None
                   ) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF Llama directory; params cast to `dtype` (default: the
    checkpoint's)."""
    directory = pathlib.Path(path)
    cfg = ModelConfig.from_hf(directory, dtype)
    tensors: dict[str, np.ndarray] = {}
    for shard in _shards(directory):
        tensors.update(_read_shard(shard))

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"{directory} lacks tensor {name!r} (expected shape {shape})")
        x = tensors.pop(name)
        if x.shape != shape:
            raise ValueError(f"tensor {name!r} in {directory} has shape {x.shape} but the "
                             f"config expects {shape}: the checkpoint does not match config.json")
        return _to_ours(name, x, cfg)

    dt = jnp.dtype(cfg.dtype)
    params = {
        "embed": jnp.asarray(take("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim)), dt),
        "norm": {"weight": jnp.asarray(take("model.norm.weight", (cfg.dim,)), dt)},
    }
    for i in range(cfg.n_layers):
        layer = params[f"layers_{i}"] = {}
        for suffix, ((module, name), shape) in _layer_tensors(cfg).items():
            tensor = take(f"model.layers.{i}.{suffix}", shape)
            layer.setdefault(module, {})[name] = jnp.asarray(tensor, dt)
        attn = layer["attn"]  # our attention projects q, k and v heads with one [D, N+2K, H]
        attn["qkv"] = jnp.concatenate([attn.pop("q"), attn.pop("k"), attn.pop("v")], axis=1)
        mlp = layer["mlp"]  # and the MLP gate and up with one [D, 2, F]
        mlp["gate_up"] = jnp.stack([mlp.pop("gate"), mlp.pop("up")], axis=1)
    if not cfg.tie_embeddings:
        head = take("lm_head.weight", (cfg.vocab_size, cfg.dim))
        params["lm_head"] = jnp.asarray(head.T, dt)
    else:
        tensors.pop("lm_head.weight", None)
    if tensors:
        raise ValueError(f"{directory} has tensors the Llama config does not use, e.g. "
                         f"{sorted(tensors)[0]!r}: is this a Llama checkpoint of this config?")
    return cfg, params


def load_tokenizer(path: str | pathlib.Path):
    """The HF tokenizer in the directory, or None when it has none."""
    directory = pathlib.Path(path)
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                  "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
