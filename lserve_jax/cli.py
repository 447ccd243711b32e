"""The `lserve` command.

    lserve generate [--model tiny|HF_DIR] (--prompt TEXT | --tokens ID ...) [--sparsity.* ...]
    lserve run CONFIG.toml [--FIELD VALUE ...]   (any ExperimentConfig field, e.g. --run.seed 3)

Typed parsing and `--help` come from tyro; every field of the config dataclasses is a flag.
"""

from __future__ import annotations

import dataclasses
import sys

import tyro

from lserve_jax.config import CacheConfig, ExperimentConfig, RunConfig, SparsityConfig
from lserve_jax.config import load_experiment

USAGE = __doc__.split("\n\n")[1]


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Generate from one prompt with any model and policy."""

    model: str = "tiny"  # a preset (random weights) or a local HF directory
    prompt: str | None = None  # text; needs a tokenizer in the model directory
    tokens: tuple[int, ...] = ()  # token ids, when there is no tokenizer
    head_gates_seed: int = 0  # random gates for duo/lserve when sparsity.head_pattern is unset
    sparsity: SparsityConfig = SparsityConfig(policy="dense")
    cache: CacheConfig = CacheConfig(max_batch=1)
    run: RunConfig = RunConfig()


def generate(args: GenerateArgs) -> list[int]:
    from lserve_jax.engine import Engine
    from lserve_jax.experiment import head_gates
    from lserve_jax.model import load_model

    cfg, params, tokenizer = load_model(args.model, args.run.seed)
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"--prompt needs a tokenizer, and {args.model!r} has none: pass "
                             "--tokens ID ... instead")
        prompt = tokenizer.encode(args.prompt)
    elif args.tokens:
        prompt = list(args.tokens)
    else:
        raise SystemExit("give --prompt TEXT or --tokens ID ...")
    gates = head_gates(args.sparsity.head_pattern, args.head_gates_seed, cfg.n_layers,
                       cfg.n_kv_heads)
    engine = Engine(cfg, params, args.sparsity, args.cache, gates)
    completion = engine.generate([prompt], args.run)[0]
    if completion.error:
        raise SystemExit(completion.error)
    print(f"tokens: {completion.tokens} ({completion.finish_reason})")
    if tokenizer is not None:
        print(f"text: {tokenizer.decode(completion.tokens)!r}")
    return completion.tokens


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("generate", "run") or argv[0] == "run" and (
            len(argv) < 2 or argv[1].startswith("-")):
        raise SystemExit(f"usage:\n{USAGE}")
    try:
        if argv[0] == "generate":
            generate(tyro.cli(GenerateArgs, args=argv[1:], prog="lserve generate"))
            return
        from lserve_jax.experiment import run_experiment

        exp = tyro.cli(ExperimentConfig, default=load_experiment(argv[1]), args=argv[2:],
                       prog=f"lserve run {argv[1]}")
        run_experiment(exp)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
