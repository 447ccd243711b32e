"""DuoAttention head identification on a project model (default: the testbed checkpoint):
trains the gates (`lserve_jax.lab.gates`) on the testbed's retrieval tasks and writes the
pattern (DuoAttention's TSV + config.json), the history and a heatmap of the gates. An HF
Llama with a text tokenizer trains on needle prompts instead: `lserve identify-heads`.

    python experiments/train_gates.py [--model testbed] --out DIR [--results DIR] [--steps N ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from lserve_jax.lab.gates import GateConfig, train_gates
from lserve_jax.lab.plots import plot_gates
from lserve_jax.lab.report import provenance
from lserve_jax.model import load_model
from lserve_jax.sparsity.heads import save_pattern


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--out", required=True, help="the pattern directory to write")
    parser.add_argument("--results", default="runs/gates",
                        help="where gates.json (history) and gates.png go")
    for field in dataclasses.fields(GateConfig):
        kind = ({"action": argparse.BooleanOptionalAction} if isinstance(field.default, bool)
                else {"type": type(field.default)})
        parser.add_argument(f"--{field.name}", default=field.default, **kind)
    args = parser.parse_args(argv)
    cfg = GateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GateConfig)})
    model = load_model(args.model)
    gates, history = train_gates(model.config, model.params, cfg)
    save_pattern(args.out, gates, sink_size=cfg.sink, recent_size=cfg.local, model=args.model,
                 gate_training=dataclasses.asdict(cfg))
    results = pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "gates.json").write_text(json.dumps(
        {**provenance(), "model": args.model, "config": dataclasses.asdict(cfg),
         "gates": gates.tolist(), "history": history}, indent=1) + "\n")
    plot_gates(gates, results / "gates.png")
    print(np.round(gates, 3))


if __name__ == "__main__":
    main()
