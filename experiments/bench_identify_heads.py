"""Gate training for head identification (`lserve identify-heads`, `lab.gates.gate_step`) on
the Llama-3-8B shape with random bf16 weights: seconds per training step and peak device memory
at each `--length` (tokens) x `--batch` (sequences). Token ids are random and the last 8 of each
row are the answers: only time and memory are measured. Per length: compile, `--warmup`
steps, then the median of `--steps` timed steps; the compiled step's temporary bytes
(`memory_analysis`) and the device's `peak_bytes_in_use` (the process's peak so far: lengths run
in ascending order; None where the device does not report it, e.g. the CPU). A length that does
not fit is a row with its error.

    python experiments/bench_identify_heads.py [--model llama3-8b] [--length 8192 ...]
        [--batch 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from experiments import benchlib
from lserve_jax.lab.gates import GateConfig, gate_step
from lserve_jax.model import load_model

ANSWERS = 8  # answer tokens at the end of each row


def row(cfg, params, gate_cfg: GateConfig, warmup: int, steps: int) -> dict:
    step, opt = gate_step(cfg, gate_cfg)
    gates = jnp.ones((cfg.n_layers, cfg.n_kv_heads), jnp.float32)
    state = opt.init(gates)
    shape = (gate_cfg.batch, gate_cfg.length)
    tokens = jax.random.randint(jax.random.key(gate_cfg.seed), shape, 0, cfg.vocab_size)
    answers = jnp.zeros(shape, bool).at[:, -ANSWERS:].set(True)
    start = time.perf_counter()
    compiled = step.lower(params, gates, state, tokens, answers).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    seconds = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        gates, state, loss, _ = compiled(params, gates, state, tokens, answers)
        jax.block_until_ready(loss)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"length": gate_cfg.length, "batch": gate_cfg.batch,
            "s_per_step": round(statistics.median(seconds), 4),
            "tokens_per_s": round(gate_cfg.batch * gate_cfg.length / statistics.median(seconds)),
            "compile_s": round(compile_s, 1),
            "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "loss": float(loss)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b",
                        help="a preset (random weights) or a model directory; 'tiny' for a "
                             "CPU smoke run")
    parser.add_argument("--length", type=int, nargs="+", default=[8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--local", type=int, default=256)
    parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute each layer's attention in the backward pass "
                             "(GateConfig.remat, on in `lserve identify-heads`)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--out", default=None,
                        help="results folder (default: experiments/results/<device>)")
    parser.add_argument("--name", default="identify_heads", help="the results file: NAME.json")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    cfg, params = model.config, model.params
    rows = []
    for length in sorted(args.length):
        gate_cfg = GateConfig(steps=args.warmup + args.steps + 1, length=length,
                              batch=args.batch, sink=args.sink, local=args.local, warmup=1,
                              remat=args.remat)
        try:
            rows.append(row(cfg, params, gate_cfg, args.warmup, args.steps))
        except Exception as err:  # noqa: BLE001 - a row of its own (out of memory); go on
            rows.append({"length": length, "batch": args.batch, "error": repr(err)[:300]})
        print(rows[-1], flush=True)
        path = benchlib.write_results(
            args.name, rows, args.out, None, model=f"{args.model}, random {cfg.dtype} weights",
            weight_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
            config={"sink": args.sink, "local": args.local, "remat": args.remat,
                    "warmup_steps": args.warmup, "timed_steps": args.steps,
                    "answers_per_row": ANSWERS})
    print("wrote", path)


if __name__ == "__main__":
    main()
