"""Selection recall of LServe's page selector on the eval prompts: per retrieval (SELECT) head,
the share of its dense attention at the answer tokens that the selected pages keep, against the
most any as many pages could keep (`lserve_jax.lab.coverage`). Writes
<out>/<name>.{json,md,png}.

    python experiments/attention_coverage.py --pages 16/4 64/16 --context 4096
    python experiments/attention_coverage.py --models testbed runs/testbed/tracking
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

import numpy as np
from tqdm.auto import tqdm

from lserve_jax.lab.ablation import apply_sweep
from lserve_jax.lab.coverage import coverage
from lserve_jax.lab.experiment import load_experiment
from lserve_jax.lab.report import markdown_table, provenance
from lserve_jax.lab.tasks import TASKS, make_sample, probe_seed
from lserve_jax.model import load_model
from lserve_jax.sparsity.heads import policy_gates
from lserve_jax.sparsity.policy import head_modes


def measure(args, exp) -> list[dict]:
    base = exp.sparsity.for_policy("lserve")
    pages = args.pages or [f"{base.page_size}/{base.logical_page_size}"]
    rows = []
    for name in args.models:
        model = load_model(name, exp.run.seed)
        cfg, params = model.config, model.params
        gates = policy_gates(base, cfg, model.pattern)
        for label in pages:
            sparsity = apply_sweep(base, "page_size", label)
            modes = head_modes(cfg, sparsity, gates)
            kept = collections.defaultdict(list)
            grid = [(task, at, j) for task in args.tasks for at in range(len(exp.depths))
                    for j in range(args.samples)]
            for task, at, j in tqdm(grid, desc=f"{name} {label}", unit="prompt"):
                s = make_sample(task, args.context, exp.depths[at],
                                probe_seed(exp.run.seed, len(exp.depths), at, exp.samples, j))
                sequence = np.concatenate([s.prompt, s.answer[:-1]])
                queries = np.arange(len(s.prompt), len(sequence))  # decode steps' queries
                for head, mass in coverage(cfg, params, sequence, queries, sparsity,
                                           modes).items():
                    kept[head].append(mass)
            for (layer, kh), masses in sorted(kept.items()):
                per_q = np.concatenate(masses, axis=-1).mean(-1)  # [2, G]
                rows.append({"model": name, "pages": label, "layer": layer, "kv_head": kh,
                             "gate": round(float(gates[layer, kh]), 3),
                             "selected": round(float(per_q[0].mean()), 3),
                             "oracle": round(float(per_q[1].mean()), 3),
                             "selected_per_query_head": np.round(per_q[0], 3).tolist(),
                             "oracle_per_query_head": np.round(per_q[1], 3).tolist()})
    return rows


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["pages"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 3.4), squeeze=False)
    width = 0.8 / (2 * len(models))
    for ax, label in zip(axes[0], variants):
        for m, model in enumerate(models):
            mine = [r for r in rows if r["pages"] == label and r["model"] == model]
            x = np.arange(len(mine))
            for k, (key, hatch) in enumerate((("selected", ""), ("oracle", "//"))):
                ax.bar(x + (2 * m + k - len(models) + 0.5) * width,
                       [100 * r[key] for r in mine], width, hatch=hatch, color=f"C{m}",
                       alpha=1.0 if key == "selected" else 0.45,
                       label=f"{model}: {'Quest pages' if key == 'selected' else 'best pages'}")
            ax.set_xticks(x, [f"L{r['layer']}K{r['kv_head']}" for r in mine])
        ax.set(ylim=(0, 100), ylabel="dense attention kept (%)", xlabel="retrieval head",
               title=f"pages {label}")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/policies_pages16_r1.toml",
                        help="experiment config: budget, head pattern, depths, seed")
    parser.add_argument("--pages", nargs="+", default=None, help='"N_P/N_L" (default: config)')
    parser.add_argument("--models", nargs="+", default=["testbed"])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=4,
                        help="prompts per task x depth (4: the policy tables' prompts)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--out", default="runs/coverage")
    parser.add_argument("--name", default="attention_coverage")
    args = parser.parse_args()
    exp = load_experiment(args.config)
    rows = measure(args, exp)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["model", "pages", "layer", "kv_head", "gate", "selected", "oracle"]
    table = markdown_table(rows, columns)
    (out / f"{args.name}.json").write_text(json.dumps(
        {**provenance(), "args": vars(args), "rows": rows}, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(
        f"# {args.name}\n\nShare of each retrieval head's dense attention (mean over its query "
        f"heads, the answer tokens of {args.samples} prompts per task x depth at context "
        f"{args.context}) on the pages LServe selects (`selected`) and on the best pages by "
        f"mass (`oracle`), budget {exp.sparsity.token_budget} "
        f"tokens.\n\n{table}\n")
    plot(rows, out / f"{args.name}.png",
         f"dense attention mass kept at the answer tokens, context {args.context}")
    print(table)


if __name__ == "__main__":
    main()
