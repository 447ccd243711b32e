"""`lserve identify-heads MODEL_DIR --out PATTERN_DIR`: DuoAttention head identification for a
local HF Llama directory. The gates (`gates.train_gates`) train on needle-retrieval samples
built with the model's own tokenizer (`needles.NeedlePrompts`); PATTERN_DIR receives
DuoAttention's `full_attention_heads.tsv` + `config.json` and `gates.json` (provenance, the
training config, the gates and the loss history).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from typing import Annotated

import numpy as np
import tyro

from lserve_jax.lab.gates import GateConfig, train_gates
from lserve_jax.lab.needles import NeedlePrompts
from lserve_jax.lab.report import provenance
from lserve_jax.model import load_model
from lserve_jax.model.hf import load_tokenizer
from lserve_jax.sparsity.heads import TSV, save_pattern
from lserve_jax.sparsity.policy import retrieval_heads

# DuoAttention's recipe for its released patterns (window 128 + 256, lr 0.02, L1 0.05, one
# sequence and 2,000 steps), at 8K tokens; attention recomputed in the backward pass, so that
# the Llama-3-8B shape fits an 80 GB card (experiments/bench_identify_heads.py)
RECIPE = GateConfig(steps=2000, length=8192, batch=1, sink=128, local=256, remat=True)
SPARSITY = 0.5  # the static sparsity the summary splits heads at


@dataclasses.dataclass(frozen=True)
class IdentifyHeadsArgs:
    """Identify the retrieval and streaming heads of a local HF Llama (DuoAttention)."""

    # an HF Llama directory: config.json, safetensors and the tokenizer
    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL_DIR")]
    # the pattern directory to write (`--sparsity.head-pattern PATTERN_DIR` serves with it)
    out: Annotated[str, tyro.conf.arg(metavar="PATTERN_DIR")]
    # gate training; the defaults are DuoAttention's recipe at 8K tokens (`RECIPE`)
    gates: Annotated[GateConfig, tyro.conf.OmitArgPrefixes] = RECIPE


def identify_heads(args: IdentifyHeadsArgs) -> np.ndarray:
    """Trains the gates of `args.model` and writes the pattern; returns the gates [L, K]. Bad
    input (not a directory, no tokenizer, too short a length) fails before any training."""
    cfg, path = args.gates, pathlib.Path(args.model)
    if not path.is_dir():
        raise ValueError(f"MODEL_DIR={args.model!r} is not a directory: pass a local HF Llama "
                         "directory (config.json, safetensors and the tokenizer)")
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"MODEL_DIR={args.model!r} has no tokenizer (tokenizer.json, "
                         "tokenizer_config.json or tokenizer.model): the samples are text, so "
                         "copy the model's tokenizer files into it (a project checkpoint "
                         "without one, like the testbed: experiments/train_gates.py)")
    prompts = NeedlePrompts(tokenizer)
    prompts.check_length(cfg.length)
    model = load_model(args.model)
    positions = _max_positions(path)
    if positions and cfg.length > positions:
        warnings.warn(f"GateConfig.length={cfg.length} exceeds the model's "
                      f"max_position_embeddings={positions}: the gates learn from positions "
                      "the model was not trained for", stacklevel=2)
    gates, history = train_gates(model.config, model.params, cfg, prompts)
    out = save_pattern(args.out, gates, sink_size=cfg.sink, recent_size=cfg.local,
                       model=args.model, gate_training=dataclasses.asdict(cfg))
    (out / "gates.json").write_text(json.dumps(
        {**provenance(), "model": args.model, "config": dataclasses.asdict(cfg),
         "samples": "needle prompts (lserve_jax.lab.needles)", "gates": gates.tolist(),
         "history": history}, indent=1) + "\n")
    print(_summary(gates, out))
    return gates


def _max_positions(path: pathlib.Path) -> int | None:
    """max_position_embeddings of the directory's config.json, where it says."""
    file = path / "config.json"
    return json.loads(file.read_text()).get("max_position_embeddings") if file.exists() else None


def _summary(gates: np.ndarray, out: pathlib.Path) -> str:
    retrieval = retrieval_heads(gates, SPARSITY)
    lines = [f"wrote {out / TSV}, {out / 'config.json'} and {out / 'gates.json'}",
             f"gates per layer (KV heads in order; retrieval heads at static sparsity "
             f"{SPARSITY}: {int(retrieval.sum())} of {retrieval.size})"]
    for layer, (row, keep) in enumerate(zip(gates, retrieval)):
        lines.append(f"  layer {layer:3d}: {int(keep.sum())} retrieve | "
                     + " ".join(f"{g:.2f}" for g in row))
    lines.append(f"serve with: --sparsity.policy lserve --sparsity.head-pattern {out}")
    return "\n".join(lines)
