r"""KV bytes per sequence and attended tokens per decode step for every policy (computed on the
CPU from the allocator and the page-list rules, no GPU), on the Llama-3-8B shape with the real
DuoAttention pattern of Llama-3-8B-Instruct-Gradient-1048k. Writes policy_costs.json and .md
to experiments/results/cpu/ (or --out).

    python experiments/policy_costs.py \
        --pattern ../shared/duo_patterns/Llama-3-8B-Instruct-Gradient-1048k
"""

from __future__ import annotations

import argparse
import pathlib

from experiments import benchlib
from lserve_jax.cache.allocator import kv_bytes_per_sequence
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.lab.report import markdown_table
from lserve_jax.sparsity.heads import load_gates
from lserve_jax.sparsity.policy import STREAM, attended_tokens, head_modes


def policy_costs(gates, contexts: tuple[int, ...], base: SparsityConfig) -> list[dict]:
    cfg = ModelConfig.from_name("llama3-8b")
    rows = []
    for context in contexts:
        dense_bytes = None
        for policy in ("dense", "streaming", "duo", "quest", "lserve"):
            sparsity = base.for_policy(policy)
            modes = head_modes(cfg, sparsity, gates)
            kv = kv_bytes_per_sequence(context, modes == STREAM, cfg, sparsity)
            dense_bytes = dense_bytes or kv
            rows.append({
                "policy": policy, "context": context,
                "kv_mib_per_seq": round(kv / 2**20, 1),
                "kv_vs_dense": round(kv / dense_bytes, 3),
                "attended_tokens_per_step": round(attended_tokens(modes, context, sparsity), 1),
                "streaming_heads": int((modes == STREAM).sum()), "page_size": sparsity.page_size})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", required=True, help="DuoAttention pattern directory")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--out", default=benchlib.RESULTS / "cpu", type=pathlib.Path,
                        help="results folder (default: experiments/results/cpu)")
    args = parser.parse_args()
    rows = policy_costs(load_gates(args.pattern), tuple(args.contexts), SparsityConfig())
    table = markdown_table(rows, list(rows[0]))
    path = benchlib.write_results(
        "policy_costs", rows, args.out, None, model="llama3-8b",
        pattern=pathlib.Path(args.pattern).name,
        sparsity="LServe defaults (N_P 64, N_L 16, budget 4096, decode sink 128 + local 256)")
    path.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
