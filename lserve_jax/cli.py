"""The `lserve` command.

    lserve generate [--model tiny|testbed|DIR] (--prompt TEXT | --tokens ID ...) [--sparsity.* ...]
    lserve serve MODEL [--port 8000] [--weight-dtype fp8] [--cache.kv-dtype int8] [--sparsity.* ...]
    lserve run CONFIG.toml [--FIELD VALUE ...]   (any ExperimentConfig field, e.g. --run.seed 3)
    lserve identify-heads MODEL_DIR --out PATTERN_DIR [--steps N --length T --batch B ...]

Typed parsing and `--help` come from tyro; every field of the config dataclasses is a flag.
`serve` starts the OpenAI-compatible server (`lserve_jax.server`, extra `serve`). `run` (accuracy
grids and policy comparisons) and `identify-heads` (DuoAttention gate training on needle prompts:
`lserve_jax.lab.identify`; every GateConfig field is a flag) are the lab's: `pip install -e
'.[lab]'`; each is imported only when asked for, so the serving library runs without their
dependencies.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated

import tyro

from lserve_jax.config import Backend, CacheConfig, ParallelConfig, PrefillPath, RunConfig
from lserve_jax.config import SchedulerConfig, SparsityConfig, WeightDtype

USAGE = __doc__.split("\n\n")[1]


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Generate from one prompt with any model and policy."""

    model: str = "tiny"  # a preset, `testbed`, a checkpoint directory or a local HF directory
    prompt: str | None = None  # text; needs a tokenizer in the model directory
    tokens: tuple[int, ...] = ()  # token ids, when there is no tokenizer
    ignore_eos: bool = False  # keep generating past the tokenizer's end-of-sequence token
    weight_dtype: WeightDtype = "auto"  # "fp8": linear layers quantized at load
    sparsity: SparsityConfig = SparsityConfig(policy="dense")
    cache: CacheConfig = CacheConfig(max_batch=1)
    run: RunConfig = RunConfig()
    parallel: ParallelConfig = ParallelConfig()  # --parallel.tp N: N GPUs split each layer


def generate(args: GenerateArgs) -> list[int]:
    from lserve_jax.llm import LLM

    llm = LLM(args.model, args.sparsity, args.cache, backend=args.run.backend,
              prefill_path=args.run.prefill_kernel, seed=args.run.seed,
              weight_dtype=args.weight_dtype, parallel=args.parallel)
    if args.prompt is not None:
        if llm.tokenizer is None:
            raise SystemExit(f"--prompt needs a tokenizer, and {args.model!r} has none: pass "
                             "--tokens ID ... instead")
        prompt = args.prompt
    elif args.tokens:
        prompt = list(args.tokens)
    else:
        raise SystemExit("give --prompt TEXT or --tokens ID ...")
    params = dataclasses.replace(args.run.sampling(), ignore_eos=args.ignore_eos)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    if out.error:
        raise SystemExit(out.error)
    print(f"tokens: {out.token_ids} ({out.finish_reason})")
    if out.text is not None:
        print(f"text: {out.text!r}")
    return out.token_ids


@dataclasses.dataclass(frozen=True)
class ServeArgs:
    """Serve a model over an OpenAI-compatible HTTP API."""

    # a preset, `testbed`, a checkpoint or a local HF directory
    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # the name clients ask for (default: MODEL)
    backend: Backend = Backend.reference  # `pallas` on a GPU
    prefill_kernel: PrefillPath = PrefillPath.windowed
    seed: int = 0  # weights of a preset (a request without a seed samples with a random one)
    weight_dtype: WeightDtype = "auto"  # "fp8": linear layers quantized at load
    sparsity: SparsityConfig = SparsityConfig(policy="dense")
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    # --parallel.tp N splits each layer over N GPUs; --parallel.dp M serves M replicas of that
    parallel: ParallelConfig = ParallelConfig()


def serve(args: ServeArgs) -> None:
    try:
        from lserve_jax.server import serve as run_server
    except ModuleNotFoundError as err:
        raise SystemExit(f"`lserve serve` needs the server's dependencies ({err.name} is "
                         "missing): pip install -e '.[serve]'") from None
    from lserve_jax.llm import LLM

    llm = LLM(args.model, args.sparsity, args.cache, backend=args.backend,
              scheduler=args.scheduler, prefill_path=args.prefill_kernel, seed=args.seed,
              weight_dtype=args.weight_dtype, parallel=args.parallel)
    run_server(llm, args.host, args.port, args.served_model_name or args.model)


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


def identify_heads(argv: list[str]) -> None:
    try:
        from lserve_jax.lab.identify import IdentifyHeadsArgs, identify_heads as identify
    except ModuleNotFoundError as err:
        raise SystemExit(f"`lserve identify-heads` needs the lab's dependencies ({err.name} is "
                         "missing): pip install -e '.[lab]'") from None
    identify(tyro.cli(IdentifyHeadsArgs, args=argv, prog="lserve identify-heads"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("generate", "serve", "run", "identify-heads")
    if not argv or argv[0] not in commands or argv in (["serve"], ["identify-heads"]) or (
            argv[0] == "run" and (len(argv) < 2 or argv[1].startswith("-"))):
        raise SystemExit(f"usage:\n{USAGE}")
    try:
        if argv[0] == "generate":
            generate(tyro.cli(GenerateArgs, args=argv[1:], prog="lserve generate"))
        elif argv[0] == "serve":
            serve(tyro.cli(ServeArgs, args=argv[1:], prog="lserve serve"))
        elif argv[0] == "identify-heads":
            identify_heads(argv[1:])
        else:
            run(argv[1], argv[2:])
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
