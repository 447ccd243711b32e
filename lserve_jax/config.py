"""Frozen, validated configuration: model shape, KV cache, sparsity policy, engine run.

Every knob of the system is a field here, so an ablation is a config edit. Validation lives in
`__post_init__` (one dataclass) and `check_compatible` (across dataclasses); errors name the
field and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import pathlib
import typing
from typing import Literal

from lserve_jax.sampling import SamplingParams
from pallas_kernels import layout
from pallas_kernels.kv_quant import KV_FORMATS

DType = Literal["float32", "bfloat16"]
Policy = Literal["dense", "streaming", "duo", "quest", "lserve"]
Granularity = Literal["query_head", "kv_head"]
KVDtype = Literal["auto", "int8", "fp8", "int8_token", "int4"]
WeightDtype = Literal["auto", "fp8"]
WEIGHT_DTYPES: tuple[str, ...] = typing.get_args(WeightDtype)

POLICIES: tuple[str, ...] = ("dense", "streaming", "duo", "quest", "lserve")


class Backend(enum.StrEnum):
    """Where attention runs (`lserve_jax.attention.backends` maps each to its kernels)."""

    reference = "reference"  # plain jnp on any device: the oracle
    cudnn = "cudnn"  # jax.nn.dot_product_attention(implementation="cudnn"); dense policy only
    pallas = "pallas"  # the Pallas Triton kernels, compiled for the GPU
    pallas_interpret = "pallas_interpret"  # the same kernels interpreted on the CPU


class PrefillPath(enum.StrEnum):
    """How backend `pallas` runs a whole prompt's attention."""

    windowed = "windowed"  # retrieval heads: cuDNN causal; streaming heads: cuDNN's sliding
    #                        window plus a sink call, merged by f32 log-sum-exp
    composite = "composite"  # retrieval heads: cuDNN causal; streaming heads: our kernel
    fused = "fused"  # every head in our kernel, one launch


def _require(ok: bool, field: str, value, fix: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: {fix}")


def random_gates_seed(head_pattern: str | None, field: str = "head_pattern") -> int | None:
    """SEED of a "random:SEED" head pattern (seeded random gates); None for a pattern directory
    or no pattern."""
    if not head_pattern or not head_pattern.startswith("random:"):
        return None
    seed = head_pattern.removeprefix("random:")
    _require(seed.isdigit(), field, head_pattern,
             "write random gates as 'random:SEED', SEED an integer >= 0")
    return int(seed)


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and value > 0, f"{type(obj).__name__}.{name}", value,
                 "must be a positive integer")


def _one_of(obj, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _require(value in allowed, f"{type(obj).__name__}.{name}", value, f"choose one of {allowed}")


def _as_enum(obj, name: str, kind: type[enum.StrEnum]) -> None:
    """Turns the field's text into `kind` (TOML, JSON and Python callers pass strings)."""
    value = getattr(obj, name)
    allowed = tuple(m.value for m in kind)
    _require(value in allowed, f"{type(obj).__name__}.{name}", value, f"choose one of {allowed}")
    object.__setattr__(obj, name, kind(value))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3" rope_type) frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        _require(self.factor >= 1.0, "RopeScaling.factor", self.factor, "must be >= 1")
        _require(self.high_freq_factor > self.low_freq_factor, "RopeScaling.high_freq_factor",
                 self.high_freq_factor, "must exceed low_freq_factor")
        _positive(self, "original_max_position")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama architecture. Presets: `ModelConfig.from_name(name)`, name one of 'tiny',
    'llama3-8b', 'llama3-70b', 'llama2-7b', 'testbed' (random weights; `load_model('testbed')`
    loads the trained checkpoint)."""

    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: DType = "float32"
    # "fp8": every linear layer's weight in float8 e4m3 with a scale per output channel, its
    # input quantized per token (lserve_jax.model.quant; `quantize_params` converts weights)
    weight_dtype: WeightDtype = "auto"

    def __post_init__(self):
        _positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "ffn_dim")
        _require(self.n_heads % self.n_kv_heads == 0, "ModelConfig.n_kv_heads", self.n_kv_heads,
                 f"must divide n_heads={self.n_heads} (grouped-query attention)")
        _require(self.head_dim % 2 == 0, "ModelConfig.head_dim", self.head_dim,
                 "must be even (RoPE rotates pairs of channels)")
        _require(self.rope_theta > 0, "ModelConfig.rope_theta", self.rope_theta, "must be > 0")
        _one_of(self, "dtype", ("float32", "bfloat16"))
        _one_of(self, "weight_dtype", WEIGHT_DTYPES)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "bfloat16": 2}[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """Dense K+V bytes per token per sequence, all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.itemsize

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ValueError(f"model preset {name!r} is unknown: choose one of "
                             f"{sorted(MODEL_PRESETS)} or pass an HF directory")
        return dataclasses.replace(MODEL_PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, path: str | pathlib.Path, dtype: DType | None = None) -> ModelConfig:
        """Reads an HF `config.json` (transformers 4 `rope_scaling` or 5 `rope_parameters`);
        a missing file or field, bad JSON or an unsupported architecture is a ValueError or
        FileNotFoundError naming the file and the field."""
        path = pathlib.Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist: pass an HF model directory "
                                    "holding config.json")
        try:
            hf = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON ({err}): restore the model's "
                             "config.json") from None
        _require(isinstance(hf, dict), str(file), type(hf).__name__, "must hold a JSON object")

        def field(name: str, kind: type = int):
            _require(name in hf, f"{file}: {name}", None,
                     "the field is missing; a Llama config.json needs it")
            try:
                return kind(hf[name])
            except (TypeError, ValueError):
                raise ValueError(f"{file}: {name}={hf[name]!r} is not a {kind.__name__}") from None

        for flag in ("attention_bias", "mlp_bias"):
            _require(not hf.get(flag, False), f"{file}: {flag}", hf.get(flag),
                     "biases are not part of the Llama architecture supported here")
        act = hf.get("hidden_act", "silu")
        _require(act == "silu", f"{file}: hidden_act", act, "only SwiGLU (silu) MLPs are supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(rope_type in ("default", "llama3"), f"{file}: rope_type", rope_type,
                 "supported RoPE types are 'default' (plain theta) and 'llama3'")
        scaling = None
        if rope_type == "llama3":
            missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings") if k not in rope]
            _require(not missing, f"{file}: rope_scaling", rope,
                     f"llama3 RoPE scaling needs {missing}")
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position=int(rope["original_max_position_embeddings"]))
        n_heads = field("num_attention_heads")
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            vocab_size=field("vocab_size"),
            dim=field("hidden_size"),
            n_layers=field("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or field("hidden_size") // n_heads),
            ffn_dim=field("intermediate_size"),
            rope_theta=float(theta),
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype=dtype or ("bfloat16" if hf_dtype == "bfloat16" else "float32"))


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "llama3-8b": ModelConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        ffn_dim=14336, rope_theta=500000.0, rope_scaling=RopeScaling(), dtype="bfloat16"),
    "llama3-70b": ModelConfig(
        vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
        ffn_dim=28672, rope_theta=500000.0, rope_scaling=RopeScaling(), dtype="bfloat16"),
    "llama2-7b": ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
        ffn_dim=11008, rope_theta=10000.0, dtype="bfloat16"),
    # the project-trained accuracy testbed (its checkpoint loads by name: `--model testbed`)
    "testbed": ModelConfig(
        vocab_size=256, dim=256, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=32, ffn_dim=512,
        tie_embeddings=True, dtype="bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """What attention each head computes. Defaults are LServe's (DESIGN section 1).

    Policies: `dense`; `streaming` (every head sink + local); `duo` (static head split only);
    `quest` (dynamic page selection only, flat pages: logical_page_size == page_size);
    `lserve` (static + dynamic, hierarchical pages, reusable selector).
    """

    policy: Policy = "lserve"
    page_size: int = 64  # N_P: tokens per physical page (the KV cache's unit of storage)
    logical_page_size: int = 16  # N_L: tokens per page-statistics slot; divides page_size
    token_budget: int = 4096  # B_tok: decode tokens a retrieval head attends to
    reuse_interval: int = 4  # R: decode steps between page re-selections
    # between reruns a retrieval head also attends to the page that was current when it
    # selected (its anchor page); False drops that page once decoding moves past it, until the
    # next rerun (a blind spot of up to R - 1 steps on the most recent tokens)
    reuse_anchor: bool = True
    prefill_sink: int = 128
    prefill_local: int = 8192
    decode_sink: int = 128
    decode_local: int = 256
    static_sparsity: float = 0.5  # fraction of (layer, KV head) pairs that stream
    # directory of DuoAttention's full_attention_heads.tsv, or "random:SEED" for seeded random
    # gates (the "randomly chosen heads" ablation)
    head_pattern: str | None = None
    keep_sink_page: bool = False  # always select the first page too
    selection_granularity: Granularity = "query_head"
    group_reduction: Literal["sum", "max"] = "sum"  # kv_head granularity: combine G heads' scores
    dense_layers: int = 0  # the first layers run dense whatever the policy (Quest: 2)
    # adaptive budget (top-p over pages): a retrieval head keeps the fewest of its best earlier
    # pages whose share of their estimated attention mass (a softmax over the page score
    # bounds) reaches adaptive_p, at most the token budget's and at least adaptive_floor pages;
    # the current page is attended anyway; 1.0 keeps the fixed top-k of token_budget
    adaptive_p: float = 1.0
    adaptive_floor: int = 1
    # prompts longer than this are prefilled chunk by chunk (0: never). Streaming heads then
    # keep prefill_local + prefill_chunk tokens of ring, so that every chunk sees exactly the
    # window an unchunked prefill sees.
    prefill_chunk: int = 0

    def __post_init__(self):
        _one_of(self, "policy", POLICIES)
        _one_of(self, "selection_granularity", ("query_head", "kv_head"))
        _one_of(self, "group_reduction", ("sum", "max"))
        _positive(self, "page_size", "logical_page_size", "token_budget", "reuse_interval",
                  "decode_local", "prefill_local")
        for name in ("prefill_sink", "decode_sink", "dense_layers", "prefill_chunk"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, f"SparsityConfig.{name}", value,
                     "must be an integer >= 0")
        for name in ("page_size", "logical_page_size"):
            value = getattr(self, name)
            _require(value & (value - 1) == 0, f"SparsityConfig.{name}", value,
                     "must be a power of two (GPU kernels tile by it)")
        _require(self.page_size % self.logical_page_size == 0, "SparsityConfig.logical_page_size",
                 self.logical_page_size, f"must divide page_size={self.page_size}")
        _require(self.token_budget % self.page_size == 0, "SparsityConfig.token_budget",
                 self.token_budget, f"must be a multiple of page_size={self.page_size}, e.g. "
                 f"{max(1, round(self.token_budget / self.page_size)) * self.page_size}")
        _require(0.0 < self.adaptive_p <= 1.0, "SparsityConfig.adaptive_p", self.adaptive_p,
                 "must lie in (0, 1] (1.0: a fixed budget of token_budget)")
        _require(isinstance(self.adaptive_floor, int)
                 and 1 <= self.adaptive_floor <= self.budget_pages - 1,
                 "SparsityConfig.adaptive_floor", self.adaptive_floor,
                 f"must lie in [1, {self.budget_pages - 1}] (pages selected besides the current "
                 "one; the token budget allows that many)")
        _require(0.0 <= self.static_sparsity <= 1.0, "SparsityConfig.static_sparsity",
                 self.static_sparsity, "must lie in [0, 1]")
        _require(self.prefill_chunk % self.page_size == 0, "SparsityConfig.prefill_chunk",
                 self.prefill_chunk, f"must be a multiple of page_size={self.page_size}")
        random_gates_seed(self.head_pattern, "SparsityConfig.head_pattern")
        if self.policy == "quest":
            _require(self.logical_page_size == self.page_size, "SparsityConfig.logical_page_size",
                     self.logical_page_size, f"policy 'quest' uses flat pages: set it equal to "
                     f"page_size={self.page_size} (Quest's default is 16 for both)")

    def for_policy(self, policy: Policy) -> SparsityConfig:
        """This config under another policy, with what defines that policy: Quest uses flat pages
        of the logical page size (N_P = N_L); every other knob is kept."""
        if policy == "quest":
            return dataclasses.replace(self, policy=policy, page_size=self.logical_page_size)
        return dataclasses.replace(self, policy=policy)

    @property
    def is_dense(self) -> bool:
        """Every head attends to every key."""
        return self.policy == "dense"

    @property
    def static(self) -> bool:
        """Heads are split into retrieval and streaming heads."""
        return self.policy in ("duo", "lserve")

    @property
    def dynamic(self) -> bool:
        """Retrieval heads attend to selected pages in decode."""
        return self.policy in ("quest", "lserve")

    @property
    def reuse_steps(self) -> int:
        """Decode steps one page selection serves: R when the policy selects pages, else 1."""
        return self.reuse_interval if self.dynamic else 1

    @property
    def budget_pages(self) -> int:
        """K: physical pages a retrieval head attends to once the context exceeds the budget."""
        return max(3, self.token_budget // self.page_size)

    @property
    def selection_width(self) -> int:
        """Slots of the stored selection (K - 1 pages, -1 padded): a power of two >= K, and at
        least 16 so that a decode kernel block of pages can always be read from it."""
        return max(16, 1 << (self.budget_pages - 1).bit_length())

    @property
    def stream_pages(self) -> int:
        """Physical pages a streaming head keeps in decode: sink pages + ring of local pages."""
        return self.sink_pages + self.ring_pages

    @property
    def window_pages(self) -> int:
        """Pages a streaming head's decode list holds: sink pages + the pages that the window
        of decode_local tokens before the current one touches (fewer than it keeps when
        chunked prefill widens the ring)."""
        return self.sink_pages + math.ceil(self.decode_local / self.page_size) + 1

    @property
    def sink_pages(self) -> int:
        return layout.sink_pages(self.decode_sink, self.page_size)

    @property
    def ring_pages(self) -> int:
        """A window of w tokens before the current one touches at most ceil(w / N_P) + 1
        pages; with chunked prefill a chunk's queries reach back prefill_local + chunk."""
        reach = self.prefill_local + self.prefill_chunk if self.prefill_chunk else 0
        return math.ceil(max(self.decode_local, reach) / self.page_size) + 1


def page_shape(text: str) -> dict[str, int]:
    """The SparsityConfig page fields of "N_P/N_L" (hierarchical pages, e.g. "64/16") or "N"
    (flat pages, N_P = N_L = N); ValueError when they are not integers."""
    n_p, _, n_l = text.partition("/")
    return {"page_size": int(n_p), "logical_page_size": int(n_l or n_p)}


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_pages` counts physical pages of one (layer, KV head), over all
    devices of a mesh (`ParallelConfig`); 0 sizes the pool for `max_batch` sequences of
    `max_seq_len` tokens under the policy in force."""

    max_seq_len: int = 2048  # prompt + generated tokens of one sequence
    max_batch: int = 4
    num_pages: int = 0
    # "auto": the model's dtype. "int8": symmetric, one scale per (sequence, layer) for K and
    # one for V, calibrated from the prompt (LServe's KV8); "fp8": e4m3, a scale per (sequence,
    # layer, KV head), likewise; "int8_token" / "int4": a scale and zero point per (token, KV
    # head) (LServe's fine-grained KV8 / KV4).
    kv_dtype: KVDtype = "auto"

    def __post_init__(self):
        _positive(self, "max_seq_len", "max_batch")
        _one_of(self, "kv_dtype", KV_FORMATS)
        _require(isinstance(self.num_pages, int) and self.num_pages >= 0, "CacheConfig.num_pages",
                 self.num_pages, "must be >= 0 (0 sizes the pool automatically)")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """The device mesh ('dp', 'tp') the engine runs on (`lserve_jax.parallel`): `tp` devices
    split each layer Megatron-style (attention and the KV cache by KV head, the MLP by its
    hidden columns), `dp` replicas of that group each serve their own share of the slots
    (`CacheConfig.max_batch`) from their own pages. 1 x 1: one device, no mesh."""

    tp: int = 1
    dp: int = 1
    # the embedding and the LM head split by vocabulary rows over tp (else every tp device
    # holds them whole: 2 x 1 GiB at Llama-3's 128K vocabulary and 4096 dims, bf16)
    shard_vocab: bool = True

    def __post_init__(self):
        _positive(self, "tp", "dp")

    @property
    def devices(self) -> int:
        return self.tp * self.dp


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """How the engine schedules requests. `continuous`: at every iteration finished requests
    leave and waiting ones take their slots (their prompts prefilled between decode chunks);
    `wave`: a batch is admitted only when the previous one has drained (static batching, the
    baseline). A prompt is prefilled `SparsityConfig.prefill_chunk` tokens per iteration (0: whole,
    padded to a multiple of `prefill_bucket`), `prefill_rows` prompts at a time; the running
    requests then decode `decode_steps` steps (rounded up to a multiple of the reuse interval R,
    so that a request joining at an iteration selects its pages at its own first step)."""

    schedule: Literal["continuous", "wave"] = "continuous"
    decode_steps: int = 16
    prefill_rows: int = 1
    prefill_bucket: int = 128

    def __post_init__(self):
        _one_of(self, "schedule", ("continuous", "wave"))
        _positive(self, "decode_steps", "prefill_rows", "prefill_bucket")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How an experiment generates: every prompt's sampling, and the attention backend."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()
    backend: Backend = Backend.reference
    prefill_kernel: PrefillPath = PrefillPath.windowed  # the whole-prompt path of backend pallas

    def __post_init__(self):
        _positive(self, "max_new_tokens")
        _as_enum(self, "backend", Backend)
        _as_enum(self, "prefill_kernel", PrefillPath)
        _require(self.temperature >= 0.0, "RunConfig.temperature", self.temperature, "must be >= 0")
        _require(0.0 < self.top_p <= 1.0, "RunConfig.top_p", self.top_p, "must lie in (0, 1]")

    def sampling(self) -> SamplingParams:
        """Each prompt's `SamplingParams` (the end-of-sequence token is not a stop: the lab's
        prompts are scored on `max_new_tokens` tokens)."""
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop_token_ids=self.stop_tokens,
                              ignore_eos=True)


def check_compatible(model: ModelConfig, sparsity: SparsityConfig) -> None:
    """Cross-config checks that no single dataclass can make."""
    _require(sparsity.dense_layers <= model.n_layers, "SparsityConfig.dense_layers",
             sparsity.dense_layers, f"must not exceed n_layers={model.n_layers}")


def check_parallel(model: ModelConfig, cache: CacheConfig, parallel: ParallelConfig) -> None:
    """What a mesh needs of the model and the cache: tp divides the KV heads (each device holds
    whole heads, with their query groups) and the MLP's hidden width, dp divides the slots and
    the pool splits evenly over the devices."""
    tp, dp = parallel.tp, parallel.dp
    for name in ("n_kv_heads", "ffn_dim"):
        _require(getattr(model, name) % tp == 0, "ParallelConfig.tp", tp,
                 f"must divide ModelConfig.{name}={getattr(model, name)}")
    if parallel.shard_vocab:
        _require(model.vocab_size % tp == 0, "ParallelConfig.shard_vocab", True,
                 f"needs tp={tp} to divide vocab_size={model.vocab_size}: set it to false "
                 "(the embedding and head replicated) or pick another tp")
    _require(cache.max_batch % dp == 0, "ParallelConfig.dp", dp,
             f"must divide CacheConfig.max_batch={cache.max_batch} (each replica serves "
             "max_batch / dp slots)")
    _require(cache.num_pages % parallel.devices == 0, "CacheConfig.num_pages", cache.num_pages,
             f"must be a multiple of dp * tp = {parallel.devices} (each device holds "
             "num_pages / (dp * tp) pages), or 0 to size the pool automatically")


def from_dict(cls, data: dict, where: str = ""):
    """Builds dataclass `cls` from nested dicts (a parsed TOML file); unknown keys are errors."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a table of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where} has no field {unknown[0]!r}: known fields are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        nested = [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
        if nested and isinstance(value, dict):
            value = from_dict(nested[0], value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
