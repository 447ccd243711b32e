"""Runs an `ExperimentConfig` (the `lserve run CONFIG` job): every policy on the same prompts,
one table of what each costs and how far it strays from dense."""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import time

import jax
import numpy as np

from lserve_jax.config import ExperimentConfig, random_gates_seed
from lserve_jax.engine import Engine
from lserve_jax.model import load_model
from lserve_jax.sparsity.heads import load_gates
from lserve_jax.sparsity.policy import STREAM, attended_tokens


def provenance() -> dict:
    """Where and when a result was produced: device, platform, jax version, UTC date."""
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
            "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def head_gates(head_pattern: str | None, seed: int, n_layers: int,
               n_kv_heads: int) -> np.ndarray:
    """[L, K] gates: the DuoAttention pattern's, or seeded uniform random ones when the pattern
    is unset (seed `seed`) or reads "random:SEED" (the randomly-chosen-heads ablation)."""
    pattern_seed = random_gates_seed(head_pattern)
    if head_pattern and pattern_seed is None:
        return load_gates(head_pattern)
    rng = np.random.default_rng(seed if pattern_seed is None else pattern_seed)
    return rng.random((n_layers, n_kv_heads))


def run_generate(exp: ExperimentConfig) -> list[dict]:
    cfg, params, _ = load_model(exp.model, exp.run.seed)
    gates = head_gates(exp.sparsity.head_pattern, exp.head_gates_seed, cfg.n_layers,
                       cfg.n_kv_heads)
    rng = np.random.default_rng(exp.run.seed)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in exp.prompt_lengths]
    reference = None
    rows = []
    for policy in exp.policies:
        sparsity = exp.sparsity.for_policy(policy)
        engine = Engine(cfg, params, sparsity, exp.cache, gates)
        engine.generate(prompts[:1], dataclasses.replace(exp.run, max_new_tokens=2))  # compile
        start = time.perf_counter()
        out = engine.generate(prompts, exp.run)
        seconds = time.perf_counter() - start
        tokens = [c.tokens for c in out]
        reference = tokens if reference is None else reference
        for prompt, toks, ref in zip(prompts, tokens, reference):
            n = len(prompt) + len(toks)
            rows.append({
                "policy": policy, "prompt_tokens": len(prompt), "new_tokens": len(toks),
                "match_first": f"{np.mean(np.equal(toks, ref[:len(toks)])):.0%}",
                "attended_per_step": round(attended_tokens(engine.modes, n, sparsity), 1),
                "kv_kib_per_seq": round(engine.kv_bytes_per_sequence(n) / 1024, 1),
                "streaming_heads": int((engine.modes == STREAM).sum()),
                "seconds_all_prompts": round(seconds, 3)})
    return rows


def run_experiment(exp: ExperimentConfig) -> tuple[list[dict], pathlib.Path]:
    """Runs the job, prints its table and writes `<output_dir>/<name>.{json,md}` (accuracy: also
    plots, see `lserve_jax.eval.ablation`)."""
    if exp.task == "accuracy":
        from lserve_jax.eval.ablation import run_accuracy, write_accuracy, write_partial

        rows = run_accuracy(exp, on_cell=lambda *done: write_partial(exp, *done))
        return rows, write_accuracy(exp, rows, exp.output_dir)[0]
    rows = run_generate(exp)
    columns = list(rows[0])
    table = markdown_table(rows, columns)
    out_dir = pathlib.Path(exp.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{exp.name}.md").write_text(
        f"# {exp.name}\n\nmatch_first: share of generated tokens equal to the first policy's.\n\n"
        + table + "\n")
    (out_dir / f"{exp.name}.json").write_text(json.dumps(
        {"config": dataclasses.asdict(exp), "rows": rows}, indent=1, default=str) + "\n")
    print(table)
    return rows, out_dir / f"{exp.name}.json"
