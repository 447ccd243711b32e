"""The `accuracy` task: KV-sparsity policies scored on the synthetic retrieval tasks.

`run_accuracy` builds one engine per (policy, sweep value, context) cell and decodes greedily
`samples` prompts per (task, depth) of `lserve_jax.lab.tasks`; a prompt counts as right when
its first generated tokens equal the answer (END included). `write_accuracy` writes the rows as
JSON, markdown tables and NIAH-style heatmaps (plus bars per sweep value when sweeping).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import textwrap
import typing
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from lserve_jax.config import (WEIGHT_DTYPES, CacheConfig, SchedulerConfig, SparsityConfig,
                               page_shape)
from lserve_jax.engine import Engine
from lserve_jax.sampling import SamplingParams
from lserve_jax.lab.tasks import (END, VOCAB_SIZE, Sample, make_sample, probe_seed, score,
                                   text_sample)
from lserve_jax.lab.experiment import ExperimentConfig
from lserve_jax.lab.report import markdown_table, provenance
from lserve_jax.model import LoadedModel, load_model
from lserve_jax.sparsity.heads import policy_gates
from lserve_jax.sparsity.policy import attended_tokens
from pallas_kernels.kv_quant import KV_FORMATS

NO_SWEEP = "-"  # the variant label of a run without a sweep
PRECISION = "precision"  # the sweep over "WEIGHTS/KV" dtypes, e.g. "fp8/int8"


def precision(exp: ExperimentConfig, label: str) -> tuple[str, str]:
    """(weight dtype, KV dtype) of a variant: the sweep value "WEIGHTS/KV" when sweeping
    precision, else the experiment's `weight_dtype` and `cache.kv_dtype`."""
    if exp.sweep != PRECISION:
        return exp.weight_dtype, exp.cache.kv_dtype
    weights, _, kv = label.partition("/")
    if weights not in WEIGHT_DTYPES or kv not in KV_FORMATS:
        raise ValueError(f"ExperimentConfig.sweep_values: {label!r} is not a precision: write "
                         f"WEIGHTS/KV, WEIGHTS one of {WEIGHT_DTYPES} and KV one of "
                         f"{KV_FORMATS} (e.g. 'fp8/int8')")
    return weights, kv


def sweep_override(field: str, value: str) -> dict:
    """The SparsityConfig fields one sweep value (text) sets, typed. page_size takes "N_P/N_L"
    ("64/16": hierarchical pages) or "N" ("16": flat pages, N_P = N_L = 16)."""
    hint = typing.get_type_hints(SparsityConfig)[field]
    try:
        if field == "page_size":
            return page_shape(value)
        if hint is bool:
            if value not in ("true", "false"):
                raise ValueError(value)
            return {field: value == "true"}
        return {field: hint(value) if hint in (int, float) else value}
    except ValueError:
        raise ValueError(f"ExperimentConfig.sweep_values: {value!r} is not a value of "
                         f"SparsityConfig.{field} ({getattr(hint, '__name__', hint)})") from None


def apply_sweep(sparsity: SparsityConfig, field: str, value: str) -> SparsityConfig:
    return dataclasses.replace(sparsity, **sweep_override(field, value))


def variants(exp: ExperimentConfig) -> list[tuple[str, SparsityConfig]]:
    """(label, sparsity) per sweep value, or one (NO_SWEEP, exp.sparsity); every one is built
    under every policy here, so that a bad value fails before any decoding."""
    if not exp.sweep:
        return [(NO_SWEEP, exp.sparsity)]
    if exp.sweep == PRECISION:
        for value in exp.sweep_values:  # each value parsed: a bad one fails here
            precision(exp, value)
        return [(value, exp.sparsity) for value in exp.sweep_values]
    out = []
    for value in exp.sweep_values:
        override = sweep_override(exp.sweep, value)
        try:
            sparsity = dataclasses.replace(exp.sparsity, **override)
            for policy in exp.policies:
                sparsity.for_policy(policy)
        except ValueError as err:
            raise ValueError(f"ExperimentConfig.sweep_values: {exp.sweep}={value!r} gives an "
                             f"invalid sparsity config (policies {list(exp.policies)}): {err}"
                             ) from None
        out.append((value, sparsity))
    return out


@dataclasses.dataclass(frozen=True)
class Probe:
    """One prompt and how to judge the tokens generated after it."""

    prompt: list[int]
    max_new: int  # tokens the answer may take
    judge: Callable[[list[int]], bool]


def cell_samples(task: str, context: int, at: int, exp: ExperimentConfig) -> list[Sample]:
    """The grid's synthetic-vocabulary samples of one cell, at depth exp.depths[at]. Seeds
    follow `at`, so no two cells of a context share a world."""
    return [make_sample(task, context, exp.depths[at],
                        probe_seed(exp.run.seed, len(exp.depths), at, exp.samples, j))
            for j in range(exp.samples)]


def token_probes(task: str, context: int, at: int, exp: ExperimentConfig) -> list[Probe]:
    """The synthetic-vocabulary prompts (testbed, presets) of one cell (`cell_samples`): exact
    match of the answer tokens."""
    return [Probe(s.prompt.tolist(), len(s.answer), functools.partial(score, answer=s.answer))
            for s in cell_samples(task, context, at, exp)]


def text_samples(task: str, context: int, at: int, exp: ExperimentConfig,
                 tokenizer) -> list[tuple[list[int], str, list[int]]]:
    """The text prompts of one cell at depth exp.depths[at] for a model with a tokenizer: (prompt
    ids, answer text, answer ids) per sample."""
    out = []
    for i in range(exp.samples):
        seed = probe_seed(exp.run.seed, len(exp.depths), at, exp.samples, i)
        prompt, answer = text_sample(task, context, exp.depths[at], seed, tokenizer)
        out.append((list(tokenizer.encode(prompt)), answer,
                    list(tokenizer.encode(answer, add_special_tokens=False))))
    return out


def text_probes(task: str, context: int, at: int, exp: ExperimentConfig,
                tokenizer) -> list[Probe]:
    """Text prompts for a model with a tokenizer (HF directories, `text_samples`): the decoded
    generation must start with the answer's number (whitespace ignored, as decoders differ in
    spacing)."""
    def judge(tokens, answer):
        return "".join(tokenizer.decode(tokens).split()).startswith("".join(answer.split()))

    return [Probe(ids, len(answer_ids) + 2, functools.partial(judge, answer=answer))
            for ids, answer, answer_ids in text_samples(task, context, at, exp, tokenizer)]


def check_vocabulary(exp: ExperimentConfig, model: LoadedModel) -> None:
    """The synthetic tasks' token ids fit a model without a tokenizer (text prompts otherwise)."""
    cfg = model.config
    if model.tokenizer is None and cfg.vocab_size < VOCAB_SIZE:
        raise ValueError(f"model={exp.model!r} has vocab_size={cfg.vocab_size}, but the tasks use "
                         f"{VOCAB_SIZE} token ids: use the testbed or a larger vocabulary")


def policy_engine(exp: ExperimentConfig, model: LoadedModel, sparsity: SparsityConfig,
                  longest: int, max_new: int, stops: tuple[int, ...], kv_dtype: str = "auto"):
    """(engine, sampling params) scoring prompts of up to `longest` tokens under `sparsity`
    (one policy's) with the KV cache in `kv_dtype`: greedy, at most `max_new` new tokens,
    stopped early at a stop token (which ends a wrong answer)."""
    cache = CacheConfig(max_seq_len=longest + max(16, max_new), max_batch=exp.cache.max_batch,
                        kv_dtype=kv_dtype)
    run = dataclasses.replace(exp.run, max_new_tokens=max_new, temperature=0.0, stop_tokens=stops)
    engine = Engine.for_model(model, sparsity, cache, backend=run.backend,
                              prefill_path=run.prefill_kernel,
                              scheduler=SchedulerConfig(prefill_rows=cache.max_batch))
    return engine, run.sampling()


def run_accuracy(exp: ExperimentConfig,
                 on_cell: Callable[[list[dict], int, int], None] | None = None) -> list[dict]:
    """One row per (policy, variant, task, context, depth): accuracy over `exp.samples` prompts.
    A model with a tokenizer gets text prompts (passkey and multikey only); others the
    synthetic-vocabulary prompts of `lserve_jax.lab.tasks`. `on_cell(rows, done, total)` runs
    after every (policy, variant, context) cell with the rows so far."""
    cells = variants(exp)
    models = {w: load_model(exp.model, exp.run.seed, w)
              for w in dict.fromkeys(precision(exp, label)[0] for label, _ in cells)}
    model = next(iter(models.values()))
    cfg, tokenizer = model.config, model.tokenizer
    for policy in exp.policies:  # a missing head pattern fails before any decoding
        policy_gates(exp.sparsity.for_policy(policy), cfg, model.pattern)
    check_vocabulary(exp, model)
    make = functools.partial(text_probes, tokenizer=tokenizer) if tokenizer else token_probes
    probes = {context: {(task, depth): make(task, context, at, exp)
                        for task in exp.tasks for at, depth in enumerate(exp.depths)}
              for context in exp.contexts}  # built first: a too-short context fails at once
    sizes = {context: (max(len(p.prompt) for group in groups.values() for p in group),
                       max(p.max_new for group in groups.values() for p in group))
             for context, groups in probes.items()}  # (longest prompt, longest answer)
    stops = (END,) if tokenizer is None else tuple(
        t for t in [tokenizer.eos_token_id] if t is not None)
    rows = []
    total = len(exp.policies) * len(cells) * len(exp.contexts)
    bar = tqdm(total=total, desc="accuracy", unit="cell")
    for policy in exp.policies:
        for label, base in cells:
            for context in exp.contexts:
                bar.set_postfix_str(f"{policy} {label} {context}")
                weights, kv = precision(exp, label)
                engine, params = policy_engine(exp, models[weights], base.for_policy(policy),
                                               *sizes[context], stops, kv)
                rows += _score(engine, params, {"policy": policy, "variant": label},
                               probes[context], context)
                bar.update()
                if on_cell:
                    on_cell(rows, bar.n, total)
    bar.close()
    return rows


def _score(engine: Engine, params: SamplingParams, cell: dict, groups: dict[tuple, list[Probe]],
           context: int) -> list[dict]:
    """Decodes every prompt of one context in one call; a row per (task, depth) group."""
    flat = [p for group in groups.values() for p in group]
    completions = iter(engine.generate([p.prompt for p in flat], params))
    attended = round(attended_tokens(engine.modes, context, engine.sparsity), 1)
    kib = round(engine.kv_bytes_per_sequence(context) / 1024, 1)
    rows = []
    for (task, depth), group in groups.items():
        hits = []
        for probe, completion in zip(group, completions):
            if completion.finish_reason == "refused":
                raise RuntimeError(f"{cell} at context {context}: the engine refused a prompt "
                                   f"({completion.error}); its pool is sized for max_batch="
                                   f"{engine.cache_cfg.max_batch} prompts, so this is a sizing "
                                   "bug")
            hits.append(probe.judge(completion.token_ids))
        rows.append({**cell, "task": task, "context": context, "depth": depth,
                     "accuracy": float(np.mean(hits)), "n": len(hits),
                     "attended_per_step": attended, "kv_kib_per_seq": kib})
    return rows


def _mean_pct(rows: list[dict]) -> float:
    """Accuracy (%) over rows, weighted by their sample counts."""
    return round(100 * sum(r["accuracy"] * r["n"] for r in rows) / sum(r["n"] for r in rows), 1)


def _group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def _tables(exp: ExperimentConfig, rows: list[dict]) -> tuple[str, str]:
    """(summary, per task): accuracy (%) per (policy, variant[, task]) and context."""
    contexts = sorted({r["context"] for r in rows})
    top = contexts[-1]
    head = ["policy", exp.sweep] if exp.sweep else ["policy"]
    summary, per_task = [], []
    for (policy, variant), group in _group(rows, "policy", "variant").items():
        line = dict(zip(head, (policy, variant)))
        by_context = _group(group, "context")
        line.update({str(c): _mean_pct(by_context[(c,)]) for c in contexts})
        line[f"attended @{top}"] = by_context[(top,)][0]["attended_per_step"]
        line[f"KV KiB @{top}"] = by_context[(top,)][0]["kv_kib_per_seq"]
        summary.append(line)
        for (task,), task_rows in _group(group, "task").items():
            by_context = _group(task_rows, "context")
            per_task.append({**dict(zip(head, (policy, variant))), "task": task,
                             **{str(c): _mean_pct(by_context[(c,)]) for c in contexts}})
    return (markdown_table(summary, list(summary[0])),
            markdown_table(per_task, list(per_task[0])))


def _plot_heatmaps(exp: ExperimentConfig, rows: list[dict], path: pathlib.Path, plt) -> None:
    """One panel per (policy, variant): accuracy (%) over context (x) x depth (y), mean over
    tasks; variants down, policies across."""
    contexts = sorted({r["context"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    groups = _group(rows, "policy", "variant")
    policies = list(dict.fromkeys(p for p, _ in groups))
    labels = list(dict.fromkeys(v for _, v in groups))
    fig, axes = plt.subplots(len(labels), len(policies), squeeze=False, layout="constrained",
                             figsize=(0.8 * len(contexts) * len(policies) + 1.5,
                                      0.4 * len(depths) * len(labels) + 1.2))
    image = None
    for (policy, label), group in groups.items():
        ax = axes[labels.index(label), policies.index(policy)]
        cells = _group(group, "depth", "context")
        grid = np.array([[_mean_pct(cells[(d, c)]) for c in contexts] for d in depths])
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 20 or value > 85 else "black")
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(policy + (f", {exp.sweep}={label}" if exp.sweep else ""), fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("context (tokens)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("depth", fontsize=7)
    bar = fig.colorbar(image, ax=axes, shrink=0.8)
    bar.set_label("accuracy (%)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    title = f"{exp.name}: accuracy, mean over {', '.join(exp.tasks)}"
    fig.suptitle(textwrap.fill(title, int(11 * fig.get_figwidth())), fontsize=9)  # ~11 chars/in
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_bars(exp: ExperimentConfig, rows: list[dict], path: pathlib.Path, plt) -> None:
    """Mean accuracy (%) per sweep value (x), one bar per policy."""
    groups = _group(rows, "policy", "variant")
    policies = list(dict.fromkeys(p for p, _ in groups))
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(1.2 * len(exp.sweep_values) + 2, 3.2))
    for k, policy in enumerate(policies):
        heights = [_mean_pct(groups[(policy, v)]) for v in exp.sweep_values]
        ax.bar(np.arange(len(heights)) + (k - (len(policies) - 1) / 2) * width, heights, width,
               label=policy)
    ax.set_xticks(range(len(exp.sweep_values)),  # long paths break at their slashes
                  [v if len(v) <= 12 else v.replace("/", "/\n") for v in exp.sweep_values])
    ax.set(xlabel=exp.sweep, ylabel="accuracy (%)", ylim=(0, 100),
           title=f"{exp.name}: mean over tasks, contexts and depths")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_partial(exp: ExperimentConfig, rows: list[dict], done: int, total: int) -> None:
    """`<name>.json` with the rows so far while a grid runs (`"partial": "done of total
    cells"`), so that a run cut short keeps what it measured; `write_accuracy` replaces it."""
    _write_json(exp, rows, pathlib.Path(exp.output_dir), partial=f"{done} of {total} cells")


def _write_json(exp: ExperimentConfig, rows: list[dict], out_dir: pathlib.Path,
                **extra) -> pathlib.Path:
    """`<name>.json`: where and when it ran, `extra`, the config and the rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{exp.name}.json"
    record = {**provenance(), **extra, "config": dataclasses.asdict(exp), "rows": rows}
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def write_accuracy(exp: ExperimentConfig, rows: list[dict], out_dir: str | pathlib.Path,
                   **extra) -> list[pathlib.Path]:
    """Writes `<name>.json` (where and when it ran, then `extra`, whose keys override those,
    then config and rows), `<name>.md`, `<name>_heatmap.png` and, with a sweep,
    `<name>_bars.png` under out_dir; prints the summary table; returns the paths (JSON first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    paths = [_write_json(exp, rows, out_dir, **extra), out_dir / f"{exp.name}.md"]
    summary, per_task = _tables(exp, rows)
    paths[1].write_text(
        f"# {exp.name}\n\nAccuracy (%) by context (tokens), mean over tasks {list(exp.tasks)} "
        f"and depths {list(exp.depths)}, {exp.samples} prompts per cell; attended keys per "
        f"decode step (with the adaptive budget, the most a step can attend) and KV per "
        f"sequence at the largest context.\n\n{summary}\n\n"
        f"## Per task (mean over depths)\n\n{per_task}\n")
    paths.append(out_dir / f"{exp.name}_heatmap.png")
    _plot_heatmaps(exp, rows, paths[-1], plt)
    if exp.sweep:
        paths.append(out_dir / f"{exp.name}_bars.png")
        _plot_bars(exp, rows, paths[-1], plt)
    print(summary)
    return paths
