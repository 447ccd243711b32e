"""Builds the HF parity fixture: a tiny random LlamaForCausalLM (GQA, llama3 RoPE scaling),
saved as sharded safetensors with a character tokenizer, plus input ids and HF's f32 logits.

Run where torch + transformers are installed (the H200 image):
    python experiments/make_hf_fixture.py tests/fixtures/hf_tiny_llama
The CI test tests/model/test_hf.py loads the directory with our loader and compares.
"""

import json
import pathlib
import sys

import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def build_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=dict(ROPE),
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_tokenizer(out: pathlib.Path) -> None:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(c): 4 + i for i, c in enumerate(range(32, 127))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>")
    fast.save_pretrained(out)


def main(out: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(build_config()).to(torch.float32).eval()
    with torch.no_grad():  # non-trivial norm weights so that a skipped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="100KB", safe_serialization=True)
    build_tokenizer(out)
    gen = np.random.default_rng(0)
    ids = gen.integers(4, 128, size=(2, 200)).astype(np.int64)  # past 64: scaled frequencies
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.float().numpy()
    np.savez_compressed(out / "parity.npz", input_ids=ids, logits=logits)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__}
    (out / "fixture_versions.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("wrote", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
