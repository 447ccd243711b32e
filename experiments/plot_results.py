"""Plots of benchmark results: decode_attention.json, prefill_attention.json, e2e.json,
tensor_parallel.json and serving_{A,B,toy}.json of a results folder, each drawn as the PNG of the same name beside it.

    python experiments/plot_results.py [DIR ...]

DIR: a results folder, or a device folder's name under experiments/results (h100, h200, ...);
by default every folder under experiments/results that holds one of those JSON files.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def _device(data: dict) -> str:
    """The device line of a title: its name, and the bandwidth measured in the run if recorded."""
    if "measured_bandwidth_gbps" in data:
        return f"{data['device']} ({data['measured_bandwidth_gbps']:.0f} GB/s measured)"
    return data["device"]


def _lines(ax, rows, names, title):
    for i, name in enumerate(names):
        pts = sorted((r["context"], r["ms"]) for r in rows if r["name"] == name and "ms" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name, color=f"C{i}")
    _context_axis(ax, [r["context"] for r in rows if "ms" in r])
    ax.set(yscale="log", ylabel="ms per layer", title=title)
    ax.grid(True, which="both", alpha=0.3)


def plot_decode(data: dict, path: pathlib.Path) -> None:
    kernels = ["dense_paged_kernel", "lserve_kv_head", "lserve_query_head", "quest_query_head"]
    names = ["dense_cudnn", "dense_xla", *kernels]
    batches = sorted({r["batch"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        _lines(ax, [r for r in data["rows"] if r["batch"] == b], names, f"decode, batch {b}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"one Llama-3-8B layer, {_device(data)}, jax {data['jax_version']}, "
                 f"{data['date']} (LServe: amortised selection included)", fontsize=9)
    _save(fig, path)


def plot_prefill(data: dict, path: pathlib.Path) -> None:
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
    fig.suptitle(f"one Llama-3-8B layer, 50% streaming heads, {_device(data)}, "
                 f"{data['date']}", fontsize=9)
    _save(fig, path)


def plot_e2e(data: dict, path: pathlib.Path) -> None:
    """Per-token decode latency vs context per batch (floors dashed) and, when measured, time
    to first token."""
    rows = [r for r in data["rows"] if "ms" in r]
    batches = sorted({r["batch"] for r in rows if r["name"].startswith("decode")})
    ttft = any(r["name"].startswith("ttft") for r in rows)
    panels = len(batches) + ttft
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4), squeeze=False)
    axes = axes[0]
    lines = sorted({(r["policy"], r.get("tuning", ""), _precision(r)) for r in rows
                    if r["name"].startswith("decode")})  # a line per policy, tuning, precision
    for ax, b in zip(axes, batches):
        for i, (policy, tuning, precision) in enumerate(lines):
            mine = [r for r in rows if r["name"] == f"decode_{policy}" and r["batch"] == b
                    and r.get("tuning", "") == tuning and _precision(r) == precision]
            label = f"{policy} {tuning} {precision}".strip()
            if mine:
                ctx, ms, floor = zip(*sorted((r["context"], r["ms"], r["floor_ms"])
                                             for r in mine))
                ax.plot(ctx, ms, marker="o", color=f"C{i}", label=label)
                ax.plot(ctx, floor, linestyle="--", marker="_", markersize=14, color=f"C{i}",
                        label=f"{label} floor")
            for r in mine:
                if policy != "dense" and r.get("speedup"):
                    ax.annotate(f"{r['speedup']:.2f}x", (r["context"], r["ms"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
        _context_axis(ax, [r["context"] for r in rows
                          if r["name"].startswith("decode") and r["batch"] == b])
        ax.set(ylabel="ms per token", title=f"decode, batch {b}")
        ax.legend(fontsize=7)
    if ttft:
        _plot_ttft(axes[-1], rows)
    fig.suptitle(f"Llama-3-8B shape, whole engine, {_device(data)}, "
                 f"jax {data['jax_version']}, {data['date']}", fontsize=9)
    _save(fig, path)


def plot_quantized_layer(data: dict, path: pathlib.Path) -> None:
    """One decode layer per KV format (bars: our dense kernel and LServe's lists; cuDNN bf16
    dashed; floors as ticks), one panel per shape; then the decode GEMMs per variant."""
    rows = [r for r in data["rows"] if "ms" in r]
    shapes = sorted({(r["batch"], r["context"]) for r in rows if "batch" in r})
    gemms = [r for r in rows if r["name"].startswith("gemm")]
    panels = len(shapes) + bool(gemms)
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 4), squeeze=False)
    for ax, (b, t) in zip(axes[0], shapes):
        mine = [r for r in rows if r.get("batch") == b and r.get("context") == t]
        kinds = list(dict.fromkeys(r["kv_dtype"] for r in mine if r["name"] != "cudnn_dense"))
        for i, policy in enumerate(("dense", "lserve")):
            got = {r["kv_dtype"]: r for r in mine if r["name"] == f"{policy}_kernel"}
            x = np.arange(len(kinds)) + (i - 0.5) * 0.38
            ax.bar(x, [got[k]["ms"] for k in kinds], 0.38, color=f"C{i}", label=policy)
            ax.scatter(x, [got[k]["floor_ms"] for k in kinds], marker="_", s=200, color="k",
                       zorder=3, label="floor" if i == 0 else None)
        cudnn = next(r for r in mine if r["name"] == "cudnn_dense")
        ax.axhline(cudnn["ms"], color="C3", linestyle="--", label="cuDNN dense, bf16")
        ax.set_xticks(range(len(kinds)), ["bf16" if k == "auto" else k for k in kinds])
        ax.set(ylabel="ms per layer", title=f"decode layer, batch {b}, {t // 1024}K")
        ax.legend(fontsize=7)
    if gemms:
        ax = axes[0][-1]
        labels = list(dict.fromkeys(f"{r['name'][5:]} M={r['tokens']}" for r in gemms))
        variants = list(dict.fromkeys(r["variant"] for r in gemms))
        for i, variant in enumerate(variants):
            got = {f"{r['name'][5:]} M={r['tokens']}": r["ms"] for r in gemms
                   if r["variant"] == variant}
            ax.bar(np.arange(len(labels)) + (i - 1) * 0.27, [got[x] for x in labels], 0.27,
                   color=f"C{i + 2}", label=variant)
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set(ylabel="ms", yscale="log", title="decode GEMMs")
        ax.legend(fontsize=7)
    fig.suptitle(f"KV formats and FP8 weights, {_device(data)}, {data['date']}", fontsize=9)
    _save(fig, path)


def plot_e2e_precision(data: dict, path: pathlib.Path) -> None:
    """Per-token decode per shape (groups) for each policy x precision (bars), floors as
    ticks; each bar labelled with its speedup over dense bf16 of the same shape."""
    rows = [r for r in data["rows"] if r["name"].startswith("decode") and "ms" in r]
    shapes = sorted({(r["batch"], r["context"]) for r in rows})
    bars = list(dict.fromkeys((r["policy"], _precision(r) or "bf16") for r in rows))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(2.2 * len(shapes) + 3, 4))
    for i, (policy, precision) in enumerate(bars):
        got = {(r["batch"], r["context"]): r for r in rows
               if r["policy"] == policy and (_precision(r) or "bf16") == precision}
        x = np.arange(len(shapes)) + (i - (len(bars) - 1) / 2) * width
        ms = [got[s]["ms"] if s in got else np.nan for s in shapes]
        ax.bar(x, ms, width, color=f"C{i}", label=f"{policy}, {precision}")
        ax.scatter(x, [got[s]["floor_ms"] if s in got else np.nan for s in shapes],
                   marker="_", s=120, color="k", zorder=3, label="floor" if i == 0 else None)
        for xi, s, value in zip(x, shapes, ms):
            base = next((r["ms"] for r in rows if (r["batch"], r["context"]) == s
                         and r["policy"] == "dense" and not _precision(r)), None)
            if base and value == value:
                ax.annotate(f"{base / value:.2f}x", (xi, value), ha="center", fontsize=6,
                            textcoords="offset points", xytext=(0, 2))
    ax.set_xticks(range(len(shapes)), [f"B={b}, {t // 1024}K" for b, t in shapes])
    ax.set(ylabel="ms per token", title="decode per token (labels: speedup over dense bf16)")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Llama-3-8B shape, whole engine, {_device(data)}, jax {data['jax_version']}, "
                 f"{data['date']}", fontsize=9)
    _save(fig, path)


def _precision(row: dict) -> str:
    """'' for bf16 weights and cache, else 'weights W8' / 'KV int8' as the row ran."""
    parts = (["W8"] if row.get("weights") == "fp8" else []) + (
        [f"KV {row['kv_dtype']}"] if row.get("kv_dtype", "auto") != "auto" else [])
    return " + ".join(parts)


def _plot_ttft(ax, rows: list[dict]) -> None:
    """Time to first token vs prompt length, per policy."""
    for i, policy in enumerate(sorted({r["policy"] for r in rows})):
        pts = sorted((r["context"], r["ms"] / 1e3) for r in rows if r["name"] == f"ttft_{policy}")
        if pts:
            ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=policy)
    for r in rows:
        if r["name"].startswith("ttft") and r["policy"] != "dense" and r.get("speedup"):
            ax.annotate(f"{r['speedup']:.2f}x", (r["context"], r["ms"] / 1e3), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
        if r["name"].startswith("ttft") and r.get("chunk"):
            ax.annotate(f"chunks of {r['chunk'] // 1024}K", (r["context"], r["ms"] / 1e3),
                        fontsize=7, textcoords="offset points", xytext=(-80, -3))
    _context_axis(ax, [r["context"] for r in rows if r["name"].startswith("ttft")])
    ax.set(xlabel="prompt (tokens)", ylabel="s", title="time to first token")
    ax.legend(fontsize=7)


def _context_axis(ax, contexts) -> None:
    """A log2 token axis ticked at the measured contexts only, labelled 16K, 128K, ..."""
    ticks = sorted(set(contexts))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 else str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    ax.set_xlabel("context (tokens)")
    ax.grid(True, alpha=0.3)


def plot_serving(data: dict, path: pathlib.Path) -> None:
    """Output tokens/s and time per output token (p50) per policy and schedule: offline as
    bars, online against the request rate as lines."""
    rows = data["rows"]
    keys = sorted({(r["policy"], r["schedule"]) for r in rows})
    offline = [r for r in rows if r["rate"] == "inf"]
    online = [r for r in rows if r["rate"] != "inf"]
    fig, axes = plt.subplots(1, 3 if online else 2, figsize=(15 if online else 10, 4))
    labels = [f"{p}\n{s}" for p, s in keys]
    for ax, field, unit in ((axes[0], "output_tokens_per_s", "output tokens / s"),
                            (axes[1], "tpot_ms_p50", "time per output token p50 (ms)")):
        values = [next((r[field] for r in offline if (r["policy"], r["schedule"]) == k), 0)
                  for k in keys]
        ax.bar(labels, values, color=[f"C{i}" for i in range(len(keys))])
        ax.set(ylabel=unit, title=f"offline: {data['mix']['requests']} requests at t = 0, "
                                  f"{data['mix']['slots']} slots")
        for x, v in enumerate(values):
            ax.annotate(f"{v:g}", (x, v), ha="center", va="bottom", fontsize=8)
    if online:
        for i, key in enumerate(keys):
            pts = sorted((r["rate"], r["output_tokens_per_s"]) for r in online
                         if (r["policy"], r["schedule"]) == key)
            if pts:
                axes[2].plot(*zip(*pts), marker="o", color=f"C{i}", label=" ".join(key))
        axes[2].set(xlabel="request rate (requests / s, Poisson)", ylabel="output tokens / s",
                    title="online")
        axes[2].legend(fontsize=8)
    fig.suptitle(f"serving, mix {path.stem.split('_')[-1]}: {_device(data)}", fontsize=10)
    _save(fig, path)


def plot_tensor_parallel(data: dict, path: pathlib.Path) -> None:
    """Per-token decode by tensor-parallel degree (and TP = 1 through the mesh path), dense and
    LServe side by side, floors as ticks, one panel per context; bars name their speedup over
    dense (LServe) or over TP = 1."""
    rows = [r for r in data["rows"] if "ms" in r]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.6 * len(contexts), 4), squeeze=False)
    for ax, t in zip(axes[0], contexts):
        mine = [r for r in rows if r["context"] == t]
        groups = list(dict.fromkeys((r["tp"], r["mesh"]) for r in mine))
        for i, policy in enumerate(("dense", "lserve")):
            got = {(r["tp"], r["mesh"]): r for r in mine if r["policy"] == policy}
            x = [j + (i - 0.5) * 0.38 for j, g in enumerate(groups) if g in got]
            bars = [got[g] for g in groups if g in got]
            ax.bar(x, [r["ms"] for r in bars], 0.38, color=f"C{i}", label=policy)
            ax.scatter(x, [r["floor_ms"] for r in bars], marker="_", s=200, color="k",
                       zorder=3, label="floor" if i == 0 else None)
            for xi, r in zip(x, bars):
                ratio = r.get("vs_dense") if policy == "lserve" else r.get("vs_tp1")
                if ratio:
                    ax.annotate(f"{ratio:.2f}x", (xi, r["ms"]), ha="center", fontsize=7,
                                textcoords="offset points", xytext=(0, 3))
        ax.set_xticks(range(len(groups)), [f"TP={tp}\n{mesh}" for tp, mesh in groups],
                      fontsize=7)
        ax.set(ylabel="ms per token", title=f"decode, batch 1, {t // 1024}K")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['model']}, {_device(data)} x {data['devices']}, "
                 f"jax {data['jax_version']}, {data['date']}", fontsize=9)
    _save(fig, path)


def _save(fig, path: pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"decode_attention": plot_decode, "prefill_attention": plot_prefill, "e2e": plot_e2e,
         "e2e_quantized": plot_e2e_precision, "quantized_layer": plot_quantized_layer,
         "tensor_parallel": plot_tensor_parallel,
         **{f"serving_{mix}": plot_serving for mix in ("A", "B", "toy")}}


def folders(named: list[str]) -> list[pathlib.Path]:
    """The folders to plot: those named (a path, or a name under experiments/results), else
    every folder under experiments/results holding one of the PLOTS' JSON files."""
    if not named:
        return sorted(d for d in RESULTS.iterdir()
                      if d.is_dir() and any((d / f"{n}.json").exists() for n in PLOTS))
    found = []
    for name in named:
        folder = next((d for d in (pathlib.Path(name), RESULTS / name) if d.is_dir()), None)
        if folder is None or not any((folder / f"{n}.json").exists() for n in PLOTS):
            raise SystemExit(f"plot_results.py {name}: no folder holding "
                             f"{', '.join(f'{n}.json' for n in PLOTS)} at {name} or "
                             f"{RESULTS / name}: name a results folder")
        found.append(folder)
    return found


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", metavar="DIR",
                        help="results folders (default: every one under experiments/results "
                             "with a JSON to plot)")
    for folder in folders(parser.parse_args(argv).dirs):
        for name, plot in PLOTS.items():
            source = folder / f"{name}.json"
            if source.exists():
                plot(json.loads(source.read_text()), source.with_suffix(".png"))
                print("wrote", source.with_suffix(".png"))


if __name__ == "__main__":
    main()
