"""Trains the accuracy testbed (lserve_jax/train.py) from a TOML config and writes its orbax
checkpoint (loaded later by `--model testbed`), the training history and the loss curve.

    python experiments/train_testbed.py experiments/configs/train_testbed.toml [--out-dir D]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tomllib

from experiments import benchlib
from lserve_jax.config import ModelConfig, from_dict
from lserve_jax.train import TrainConfig, save_checkpoint, train


def plot_history(history: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    kept = [r for r in history if "kept" in r]  # TrainConfig.concentrate_weight > 0
    fig, axes = plt.subplots(1, 3 if kept else 2, figsize=(15 if kept else 10, 3.5))
    ax1, ax2 = axes[:2]
    ax1.plot(steps, [r["loss"] for r in history],
             label="weighted loss" + (" + concentration" if kept else ""))
    ax1.plot(steps, [r["filler_ce"] for r in history], label="filler cross entropy")
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats")
    ax1.legend()
    kinds = {(False, False): "", (True, False): " (streaming heads restricted)",
             (True, True): " (streaming + page-selected heads)"}
    for kind, mode in kinds.items():
        rows = [r for r in history
                if (r.get("streamed", False), bool(r.get("selected"))) == kind]
        if not rows:
            continue
        x = [r["step"] for r in rows]
        ax2.plot(x, [100 * r["answer_acc"] for r in rows], label=f"training rows{mode}")
        if any(r.get("eval_acc") for r in rows):
            ax2.plot(x, [100 * r.get("eval_acc", 0) for r in rows],
                     label=f"eval-shaped rows{mode}")
    ax2.legend()
    ax2.set_xlabel("step")
    ax2.set_ylabel("answer tokens predicted (%)")
    if kept:
        axes[2].plot([r["step"] for r in kept], [100 * r["kept"] for r in kept])
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("retrieval heads' attention kept (%)")
        axes[2].set_title("on the selected pages, at answer tokens", fontsize=9)
    fig.suptitle("testbed training (teacher-forced; every length mixed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out-dir", default=None, help="checkpoint directory (overrides)")
    parser.add_argument("--results", default=str(benchlib.RESULTS),
                        help="where <config stem>.{json,png} (history, loss curve) go")
    args = parser.parse_args()
    with open(args.config, "rb") as f:
        cfg = from_dict(TrainConfig, tomllib.load(f))
    if args.out_dir:
        cfg = dataclasses.replace(cfg, out_dir=args.out_dir)
    params, history = train(cfg)
    save_checkpoint(cfg.out_dir, ModelConfig.from_name(cfg.model), params)
    results = pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = pathlib.Path(args.config).stem
    (results / f"{stem}.json").write_text(json.dumps(
        {**benchlib.header(), "config": dataclasses.asdict(cfg), "history": history}, indent=1))
    plot_history(history, results / f"{stem}.png")
    print(f"checkpoint in {cfg.out_dir}; last: {history[-1]}")


if __name__ == "__main__":
    main()
