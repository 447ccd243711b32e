import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from lserve_jax.attention import AttentionMetadata, PagedAttention
from lserve_jax.config import SparsityConfig
from lserve_jax.model.hf import _layer_tensors, load_hf_params, load_tokenizer
from lserve_jax.model.llama import Llama
from lserve_jax.sparsity.policy import head_modes
from tests.helpers import allocated_cache

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "hf_tiny_llama"
HF_CONFIG = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
             "tie_word_embeddings": False, "rope_theta": 10000.0, "torch_dtype": "float32"}


def _write_checkpoint(directory: pathlib.Path, drop=None, reshape=None, extra=None):
    from lserve_jax.config import ModelConfig

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    cfg = ModelConfig.from_hf(directory)
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": (50, 16), "model.norm.weight": (16,),
               "lm_head.weight": (50, 16)}
    for i in range(2):
        for suffix, (_, shape) in _layer_tensors(cfg).items():
            tensors[f"model.layers.{i}.{suffix}"] = shape
    if reshape:
        tensors[reshape] = (3, 3)
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in tensors.items()
              if k != drop}
    if extra:
        arrays[extra] = np.zeros(2, np.float32)
    names = sorted(arrays)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: arrays[k] for k in keys}, str(directory / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return arrays


def test_sharded_checkpoint_loads_into_our_layouts(tmp_path):
    arrays = _write_checkpoint(tmp_path)
    cfg, params = load_hf_params(tmp_path)
    qkv = np.asarray(params["layers_1"]["attn"]["qkv"])  # [D, N + 2K, H]
    n, kh, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    assert qkv.shape == (cfg.dim, n + 2 * kh, h)
    for offset, name in ((0, "q"), (n, "k"), (n + kh, "v")):
        hf = arrays[f"model.layers.1.self_attn.{name}_proj.weight"]  # [heads*H, D]
        np.testing.assert_array_equal(qkv[:, offset + 1, 3], hf[h + 3])
    o = np.asarray(params["layers_0"]["attn"]["o"])  # [N, H, D]
    np.testing.assert_array_equal(o[1, 2], arrays["model.layers.0.self_attn.o_proj.weight"][:, 6])
    np.testing.assert_array_equal(np.asarray(params["lm_head"]),
                                  arrays["lm_head.weight"].T)
    assert load_tokenizer(tmp_path) is None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(drop="model.layers.1.mlp.up_proj.weight"), KeyError, "model.layers.1.mlp.up_proj"),
    (dict(reshape="model.layers.0.self_attn.k_proj.weight"), ValueError, "k_proj.weight.*shape"),
    (dict(extra="model.layers.0.self_attn.q_norm.weight"), ValueError, "q_norm"),
])
def test_mismatched_checkpoints_name_the_tensor(tmp_path, kwargs, error, match):
    _write_checkpoint(tmp_path, **kwargs)
    with pytest.raises(error, match=match):
        load_hf_params(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_shard_names_the_file(tmp_path, damage):
    _write_checkpoint(tmp_path)
    shard = tmp_path / "b.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data)
    with pytest.raises(ValueError, match="b.safetensors could not be read as safetensors"):
        load_hf_params(tmp_path)


def test_missing_shard_is_reported(tmp_path):
    _write_checkpoint(tmp_path)
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="b.safetensors"):
        load_hf_params(tmp_path)


def test_logits_match_hugging_face():
    """HF's own f32 logits of a tiny random LlamaForCausalLM (GQA 8:2, llama3 RoPE scaling
    with original_max_position 64, 200 positions), made by experiments/make_hf_fixture.py.
    Tolerance 1e-4 relative to the logit scale: both sides compute in f32 but sum in different
    orders (torch CPU vs XLA), and the error grows through 2 layers and a 128-way softmax."""
    cfg, params = load_hf_params(FIXTURE)
    assert cfg.rope_scaling is not None and cfg.n_kv_heads < cfg.n_heads
    data = np.load(FIXTURE / "parity.npz")
    ids, expected = data["input_ids"], data["logits"]
    b, t = ids.shape
    sparsity = SparsityConfig(policy="dense", page_size=16, logical_page_size=16)
    modes = head_modes(cfg, sparsity)
    cache, _ = allocated_cache(cfg, sparsity, [t] * b, modes)
    meta = AttentionMetadata(new_lens=jnp.full((b,), t, jnp.int32), modes=jnp.asarray(modes),
                             step=jnp.int32(0))
    logits, _ = jax.jit(Llama(cfg, PagedAttention(sparsity)).apply)(
        {"params": params}, jnp.asarray(ids, jnp.int32),
        jnp.broadcast_to(jnp.arange(t), (b, t)), cache, meta)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4 * scale, rtol=0)
    tokenizer = load_tokenizer(FIXTURE)  # one token per character: id = 4 + ord(c) - 32
    assert tokenizer.encode("hi!", add_special_tokens=False) == [4 + ord(c) - 32 for c in "hi!"]
