"""Plots of the committed benchmark results (experiments/results/*.json -> *.png).

    python experiments/plot_results.py
"""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _lines(ax, rows, names, title):
    for i, name in enumerate(names):
        pts = sorted((r["context"], r["ms"]) for r in rows if r["name"] == name and "ms" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name, color=f"C{i}")
    _context_axis(ax, [r["context"] for r in rows if "ms" in r])
    ax.set(yscale="log", ylabel="ms per layer", title=title)
    ax.grid(True, which="both", alpha=0.3)


def plot_decode() -> pathlib.Path:
    data = _load("decode_attention")
    kernels = ["dense_paged_kernel", "lserve_kv_head", "lserve_query_head", "quest_query_head"]
    names = ["dense_cudnn", "dense_xla", *kernels]
    batches = sorted({r["batch"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        _lines(ax, [r for r in data["rows"] if r["batch"] == b], names, f"decode, batch {b}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"one Llama-3-8B layer, {data['device']}, jax {data['jax_version']}, "
                 f"{data['date']} (LServe: amortised selection included)", fontsize=9)
    return _save(fig, "decode_attention")


def plot_prefill() -> pathlib.Path:
    data = _load("prefill_attention")
    names = ["cudnn_dense", "fused_dense", "fused_half_stream_local8192",
             "composite_half_stream_local8192", "windowed_half_stream_local8192",
             "windowed_half_stream_local4096"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    _lines(ax, data["rows"], names, "prefill attention, batch 1")
    for r in data["rows"]:
        if r["name"] == "windowed_half_stream_local8192":
            ax.annotate(f"{r['speedup']:.2f}x", (r["context"], r["ms"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
    ax.legend(fontsize=7)
    fig.suptitle(f"one Llama-3-8B layer, 50% streaming heads, {data['device']}, "
                 f"{data['date']}", fontsize=9)
    return _save(fig, "prefill_attention")


def plot_e2e() -> pathlib.Path:
    """Per-token decode latency vs context per batch (floors dashed) and time to first token."""
    data = _load("e2e")
    rows = [r for r in data["rows"] if "ms" in r]
    batches = sorted({r["batch"] for r in rows if r["name"].startswith("decode")})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.2 * (len(batches) + 1), 4))
    for ax, b in zip(axes, batches):
        for i, policy in enumerate(sorted({r["policy"] for r in rows})):
            pts = sorted((r["context"], r["ms"], r["floor_ms"]) for r in rows
                         if r["name"] == f"decode_{policy}" and r["batch"] == b)
            if pts:
                ctx, ms, floor = zip(*pts)
                ax.plot(ctx, ms, marker="o", color=f"C{i}", label=policy)
                ax.plot(ctx, floor, linestyle="--", marker="_", markersize=14, color=f"C{i}",
                        label=f"{policy} floor")
            for r in rows:
                if (r["name"] == f"decode_{policy}" and r["batch"] == b and policy != "dense"
                        and r.get("speedup")):
                    ax.annotate(f"{r['speedup']:.2f}x", (r["context"], r["ms"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
        _context_axis(ax, [r["context"] for r in rows
                          if r["name"].startswith("decode") and r["batch"] == b])
        ax.set(ylabel="ms per token", title=f"decode, batch {b}")
        ax.legend(fontsize=7)
    for i, policy in enumerate(sorted({r["policy"] for r in rows})):
        pts = sorted((r["context"], r["ms"] / 1e3) for r in rows if r["name"] == f"ttft_{policy}")
        if pts:
            axes[-1].plot(*zip(*pts), marker="o", color=f"C{i}", label=policy)
    for r in rows:
        if r["name"].startswith("ttft") and r["policy"] != "dense" and r.get("speedup"):
            axes[-1].annotate(f"{r['speedup']:.2f}x", (r["context"], r["ms"] / 1e3), fontsize=7,
                              textcoords="offset points", xytext=(4, -10))
        if r["name"].startswith("ttft") and r.get("chunk"):
            axes[-1].annotate(f"chunks of {r['chunk'] // 1024}K", (r["context"], r["ms"] / 1e3),
                              fontsize=7, textcoords="offset points", xytext=(-80, -3))
    _context_axis(axes[-1], [r["context"] for r in rows if r["name"].startswith("ttft")])
    axes[-1].set(xlabel="prompt (tokens)", ylabel="s", title="time to first token")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"Llama-3-8B shape, whole engine, {data['device']}, jax {data['jax_version']}, "
                 f"{data['date']}", fontsize=9)
    return _save(fig, "e2e")


def _context_axis(ax, contexts) -> None:
    """A log2 token axis ticked at the measured contexts only, labelled 16K, 128K, ..."""
    ticks = sorted(set(contexts))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t // 1024}K" for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    ax.set_xlabel("context (tokens)")
    ax.grid(True, alpha=0.3)


def _save(fig, name: str) -> pathlib.Path:
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for made in (plot_decode(), plot_prefill(), plot_e2e()):
        print("wrote", made)
