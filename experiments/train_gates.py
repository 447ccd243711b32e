"""DuoAttention head identification on a model (default: the testbed checkpoint): trains the
gates (lserve_jax/duo.py) and writes the pattern (DuoAttention's TSV + config.json), the
history and a heatmap of the gates.

    python experiments/train_gates.py [--model testbed] [--out experiments/patterns/testbed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from experiments import benchlib
from lserve_jax.duo import GateConfig, train_gates
from lserve_jax.model import load_model
from lserve_jax.sparsity.heads import save_pattern


def plot_gates(gates: np.ndarray, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + gates.shape[1], 1 + 0.45 * gates.shape[0]))
    im = ax.imshow(gates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (layer, head), g in np.ndenumerate(gates):
        ax.text(head, layer, f"{g:.2f}", ha="center", va="center",
                color="black" if g > 0.5 else "white")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(gates.shape[1]))
    ax.set_yticks(range(gates.shape[0]))
    fig.colorbar(im, label="gate (1 = needs full attention)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--out", default="experiments/patterns/testbed")
    parser.add_argument("--results", default=str(benchlib.RESULTS))
    for field in dataclasses.fields(GateConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    cfg = GateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GateConfig)})
    model_cfg, params, _ = load_model(args.model)
    gates, history = train_gates(model_cfg, params, cfg)
    save_pattern(args.out, gates, sink_size=cfg.sink, recent_size=cfg.local, model=args.model,
                 gate_training=dataclasses.asdict(cfg))
    results = pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "testbed_gates.json").write_text(json.dumps(
        {**benchlib.header(), "config": dataclasses.asdict(cfg), "gates": gates.tolist(),
         "history": history}, indent=1))
    plot_gates(gates, results / "testbed_gates.png")
    print(np.round(gates, 3))


if __name__ == "__main__":
    main()
