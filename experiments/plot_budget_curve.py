"""Accuracy against pages attended per step: the fixed budget (`budget_n20_curve`) and the
adaptive top-p budget (`adaptive_n20`, `adaptive_n20_floor3`) on the testbed, 16/4 pages,
R = 1. A fixed budget of B tokens attends B / 16 pages a retrieval head; the adaptive budget's
pages are measured by the recall task at the answer steps of the 2K and 8K prompts
(`recall_adaptive`, `recall_adaptive_floor3`: 4 prompts per task x depth). Writes
<accuracy dir>/budget_curve.png and prints the points.

    python experiments/plot_budget_curve.py [--accuracy experiments/results/h100/accuracy]
        [--recall experiments/results/cpu/recall]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
CONTEXTS = (2048, 8192)  # where the recall task measured the pages
TICKS = (2, 3, 4, 6, 8, 12, 16)


def accuracy(path: pathlib.Path) -> dict[str, dict[int, float]]:
    """{variant: {context: accuracy %}} of an accuracy JSON (mean over tasks and depths)."""
    out: dict[str, dict[int, list]] = {}
    for row in json.loads(path.read_text())["rows"]:
        cell = out.setdefault(row["variant"], {}).setdefault(row["context"], [0.0, 0])
        cell[0] += row["accuracy"] * row["n"]
        cell[1] += row["n"]
    return {v: {c: 100 * hit / n for c, (hit, n) in by.items()} for v, by in out.items()}


def pages(path: pathlib.Path) -> dict[str, float]:
    """{sweep value: mean pages a retrieval head attends per answer step} of a recall JSON."""
    record = json.loads(path.read_text())
    sweep = record["config"]["sweep"]
    return {row[sweep]: row["pages"] for row in record["summary"]}


def points(acc_dir: pathlib.Path, recall_dir: pathlib.Path) -> list[dict]:
    rows = []
    fixed = accuracy(acc_dir / "budget_n20_curve.json")
    for budget, by in fixed.items():
        rows.append({"series": "fixed top-k", "label": f"{budget} tokens",
                     "pages": int(budget) // 16, **{c: by[c] for c in CONTEXTS}})
    for name, recall, floor in (("adaptive_n20", "recall_adaptive", 1),
                                ("adaptive_n20_floor3", "recall_adaptive_floor3", 3)):
        kept = pages(recall_dir / f"{recall}.json")
        for p, by in accuracy(acc_dir / f"{name}.json").items():
            rows.append({"series": f"top-p, at least {floor} page{'s' * (floor > 1)}",
                         "label": f"p {p}", "pages": kept[p], **{c: by[c] for c in CONTEXTS}})
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, len(CONTEXTS), figsize=(11, 4), sharey=True)
    for ax, context in zip(axes, CONTEXTS):
        for i, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
            mine = sorted((r for r in rows if r["series"] == series), key=lambda r: r["pages"])
            ax.plot([r["pages"] for r in mine], [r[context] for r in mine], marker="o",
                    color=f"C{i}", label=series)
            for r in mine:  # labels below the points, the last series' above them
                ax.annotate(r["label"], (r["pages"], r[context]), fontsize=7,
                            textcoords="offset points", xytext=(4, 6 if i == 2 else -10))
        ax.set(xlabel="pages attended per step by a retrieval head (16 tokens each)",
               title=f"context {context}", xscale="log")
        ax.set_xticks(TICKS, [str(t) for t in TICKS])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("testbed, 16/4 pages, R = 1: accuracy against the pages each step reads",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", type=pathlib.Path, default=RESULTS / "h100" / "accuracy")
    parser.add_argument("--recall", type=pathlib.Path, default=RESULTS / "cpu" / "recall")
    args = parser.parse_args(argv)
    rows = points(args.accuracy, args.recall)
    for row in rows:
        print(row)
    plot(rows, args.accuracy / "budget_curve.png")


if __name__ == "__main__":
    main()
