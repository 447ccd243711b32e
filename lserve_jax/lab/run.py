"""Runs an `ExperimentConfig` (`lserve run CONFIG`): task `generate` decodes the same random
prompts under every policy and tabulates what each costs and how far it strays from dense;
task `accuracy` scores the policies on the testbed's retrieval tasks (`lserve_jax.lab.ablation`);
task `recall` measures how much dense attention their page selection keeps on the same prompts
(`lserve_jax.lab.coverage`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from lserve_jax.config import SchedulerConfig
from lserve_jax.engine import Engine
from lserve_jax.lab.ablation import run_accuracy, write_accuracy, write_partial
from lserve_jax.lab.coverage import run_recall, write_recall
from lserve_jax.lab.experiment import ExperimentConfig
from lserve_jax.lab.report import markdown_table, provenance
from lserve_jax.model import load_model
from lserve_jax.sparsity.policy import STREAM, attended_tokens


def run_generate(exp: ExperimentConfig) -> list[dict]:
    model = load_model(exp.model, exp.run.seed, exp.weight_dtype)
    cfg = model.config
    rng = np.random.default_rng(exp.run.seed)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in exp.prompt_lengths]
    reference = None
    rows = []
    for policy in exp.policies:
        sparsity = exp.sparsity.for_policy(policy)
        engine = Engine.for_model(model, sparsity, exp.cache, backend=exp.run.backend,
                                  prefill_path=exp.run.prefill_kernel,
                                  scheduler=SchedulerConfig(prefill_rows=exp.cache.max_batch))
        params = exp.run.sampling()
        engine.generate(prompts[:1], dataclasses.replace(params, max_tokens=2))  # compile
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = [c.token_ids for c in out]
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
    """Runs the job, prints its table and writes `<output_dir>/<name>.{json,md}` (accuracy and
    recall: also plots, see `lserve_jax.lab.ablation` and `lserve_jax.lab.coverage`)."""
    if exp.task == "accuracy":
        rows = run_accuracy(exp, on_cell=lambda *done: write_partial(exp, *done))
        return rows, write_accuracy(exp, rows, exp.output_dir)[0]
    if exp.task == "recall":
        rows = run_recall(exp)
        return rows, write_recall(exp, rows, exp.output_dir)[0]
    rows = run_generate(exp)
    columns = list(rows[0])
    table = markdown_table(rows, columns)
    out_dir = pathlib.Path(exp.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{exp.name}.md").write_text(
        f"# {exp.name}\n\nmatch_first: share of generated tokens equal to the first policy's.\n\n"
        + table + "\n")
    (out_dir / f"{exp.name}.json").write_text(json.dumps(
        {**provenance(), "config": dataclasses.asdict(exp), "rows": rows}, indent=1,
        default=str) + "\n")
    print(table)
    return rows, out_dir / f"{exp.name}.json"
