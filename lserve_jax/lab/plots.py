"""Plots of the testbed recipe (a training run's curves, a head pattern's gates) and of the
`recall` task (kept vs oracle attention per retrieval head)."""

from __future__ import annotations

import pathlib

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], path: pathlib.Path, title: str) -> None:
    """Loss and answer accuracy over a training run (and the retrieval heads' kept attention
    when it trained with the concentration loss)."""
    plt = _pyplot()
    steps = [r["step"] for r in history]
    kept = [r for r in history if "kept" in r]
    fig, axes = plt.subplots(1, 3 if kept else 2, figsize=(15 if kept else 10, 3.5))
    ax1, ax2 = axes[:2]
    ax1.plot(steps, [r["loss"] for r in history],
             label="weighted loss" + (" + concentration" if kept else ""))
    ax1.plot(steps, [r["filler_ce"] for r in history], label="filler cross entropy")
    ax1.set(xlabel="step", ylabel="nats")
    ax1.legend()
    kinds = {(False, False): "", (True, False): " (streaming heads restricted)",
             (True, True): " (streaming + page-selected heads)"}
    for kind, mode in kinds.items():
        rows = [r for r in history if (r.get("streamed", False), bool(r.get("selected"))) == kind]
        if not rows:
            continue
        x = [r["step"] for r in rows]
        ax2.plot(x, [100 * r["answer_acc"] for r in rows], label=f"training rows{mode}")
        if any(r.get("eval_acc") for r in rows):
            ax2.plot(x, [100 * r.get("eval_acc", 0) for r in rows],
                     label=f"eval-shaped rows{mode}")
    ax2.legend()
    ax2.set(xlabel="step", ylabel="answer tokens predicted (%)")
    if kept:
        axes[2].plot([r["step"] for r in kept], [100 * r["kept"] for r in kept])
        axes[2].set(xlabel="step", ylabel="retrieval heads' attention kept (%)")
        axes[2].set_title("on the selected pages, at answer tokens", fontsize=9)
    fig.suptitle(f"{title} (teacher-forced; every length mixed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gates(gates: np.ndarray, path: pathlib.Path) -> None:
    """A heatmap of DuoAttention gates, [L, K]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2 + gates.shape[1], 1 + 0.45 * gates.shape[0]))
    image = ax.imshow(gates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (layer, head), g in np.ndenumerate(gates):
        ax.text(head, layer, f"{g:.2f}", ha="center", va="center",
                color="black" if g > 0.5 else "white")
    ax.set(xlabel="KV head", ylabel="layer", xticks=range(gates.shape[1]),
           yticks=range(gates.shape[0]))
    fig.colorbar(image, label="gate (1 = needs full attention)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall(rows: list[dict], titles: dict[tuple[str, str], str], path: pathlib.Path,
                title: str) -> None:
    """Bars per retrieval head: the dense attention kept on the pages the decode attends to and
    on the best as many pages (`lserve_jax.lab.coverage`), one panel per (policy, variant)
    (`titles` names them) with its mean pages attended."""
    plt = _pyplot()
    width = max(3.5, 0.35 * len(rows) / len(titles) + 1.5)  # inches per panel
    fig, axes = plt.subplots(1, len(titles), figsize=(width * len(titles), 3.4), squeeze=False,
                             sharey=True)
    for ax, (cell, name) in zip(axes[0], titles.items()):
        mine = [r for r in rows if (r["policy"], r["variant"]) == cell]
        x = np.arange(len(mine))
        ax.bar(x - 0.2, [100 * r["kept"] for r in mine], 0.4, color="C0",
               label="pages the decode attends to")
        ax.bar(x + 0.2, [100 * r["oracle"] for r in mine], 0.4, color="C0", alpha=0.45,
               hatch="//", label="best as many pages")
        ax.set_xticks(x, [f"L{r['layer']}K{r['kv_head']}" for r in mine], fontsize=7,
                      rotation=90 if len(mine) > 12 else 0)
        pages = np.mean([r["pages"] for r in mine])
        ax.set(ylim=(0, 100), xlabel="retrieval head")
        ax.set_title(f"{name} ({pages:.1f} pages)", fontsize=8)
    axes[0, 0].set_ylabel("dense attention kept (%)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
