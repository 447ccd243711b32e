"""The `lserve` command.

    lserve generate [--model tiny|testbed|DIR] (--prompt TEXT | --tokens ID ...) [--sparsity.* ...]
    lserve run CONFIG.toml [--FIELD VALUE ...]   (any ExperimentConfig field, e.g. --run.seed 3)

Typed parsing and `--help` come from tyro; every field of the config dataclasses is a flag.
`run` is the lab's (accuracy grids and policy comparisons: `pip install -e '.[lab]'`); it is
imported only when asked for, so the serving library runs without the lab's dependencies.
"""

from __future__ import annotations

import dataclasses
import sys

import tyro

from lserve_jax.config import CacheConfig, RunConfig, SparsityConfig

USAGE = __doc__.split("\n\n")[1]


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Generate from one prompt with any model and policy."""

    model: str = "tiny"  # a preset, `testbed`, a checkpoint directory or a local HF directory
    prompt: str | None = None  # text; needs a tokenizer in the model directory
    tokens: tuple[int, ...] = ()  # token ids, when there is no tokenizer
    ignore_eos: bool = False  # keep generating past the tokenizer's end-of-sequence token
    sparsity: SparsityConfig = SparsityConfig(policy="dense")
    cache: CacheConfig = CacheConfig(max_batch=1)
    run: RunConfig = RunConfig()


def generate(args: GenerateArgs) -> list[int]:
    from lserve_jax.engine import Engine
    from lserve_jax.model import load_model

    model = load_model(args.model, args.run.seed)
    tokenizer = model.tokenizer
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"--prompt needs a tokenizer, and {args.model!r} has none: pass "
                             "--tokens ID ... instead")
        prompt = tokenizer.encode(args.prompt)
    elif args.tokens:
        prompt = list(args.tokens)
    else:
        raise SystemExit("give --prompt TEXT or --tokens ID ...")
    engine = Engine.for_model(model, args.sparsity, args.cache)
    run = args.run
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not args.ignore_eos and eos not in run.stop_tokens:
        run = dataclasses.replace(run, stop_tokens=(*run.stop_tokens, eos))
    completion = engine.generate([prompt], run)[0]
    if completion.error:
        raise SystemExit(completion.error)
    print(f"tokens: {completion.tokens} ({completion.finish_reason})")
    if tokenizer is not None:
        print(f"text: {tokenizer.decode(completion.tokens)!r}")
    return completion.tokens


def run(config: str, overrides: list[str]) -> None:
    try:
        from lserve_jax.lab.experiment import ExperimentConfig, load_experiment
        from lserve_jax.lab.run import run_experiment
    except ModuleNotFoundError as err:
        raise SystemExit(f"`lserve run` needs the lab's dependencies ({err.name} is missing): "
                         "pip install -e '.[lab]'") from None
    exp = tyro.cli(ExperimentConfig, default=load_experiment(config), args=overrides,
                   prog=f"lserve run {config}")
    run_experiment(exp)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("generate", "run") or argv[0] == "run" and (
            len(argv) < 2 or argv[1].startswith("-")):
        raise SystemExit(f"usage:\n{USAGE}")
    try:
        if argv[0] == "generate":
            generate(tyro.cli(GenerateArgs, args=argv[1:], prog="lserve generate"))
        else:
            run(argv[1], argv[2:])
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
