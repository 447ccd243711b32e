"""The engine: one model + policy, a page pool, the scheduler, and the jitted steps.

`add_request` queues a prompt; each `step()` runs one iteration (admit, prefill a chunk,
decode a chunk, retire) and returns the outputs that changed; `generate` runs a list of
prompts to the end. A request reserves every page it can need (prompt + max_tokens) when it is
admitted, so the jitted steps never allocate; a request the pool cannot hold even when empty
is refused on arrival, with the reason, and the others run unharmed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lserve_jax.attention import KernelTuning, PagedAttention, Phase
from lserve_jax.cache.allocator import PageAllocator, SequencePages, kv_bytes_per_sequence
from lserve_jax.cache.allocator import pages_per_device
from lserve_jax.cache.paged import cache_specs, empty_cache
from lserve_jax.config import Backend, CacheConfig, ModelConfig, ParallelConfig, PrefillPath
from lserve_jax.config import SchedulerConfig, SparsityConfig, check_compatible, check_parallel
import lserve_jax.engine.steps as steps
from lserve_jax.engine.outputs import CompletionOutput, Detokenizer, RequestMetrics
from lserve_jax.engine.outputs import RequestOutput
from lserve_jax.engine.scheduler import Request, Scheduler
from lserve_jax.model import LoadedModel
from lserve_jax.parallel import device_stream_heads, make_mesh, shard_params, shardings
from lserve_jax.sampling import SamplingParams
from lserve_jax.sparsity.heads import policy_gates
from lserve_jax.sparsity.policy import STREAM, head_modes
from pallas_kernels.layout import TRASH_PAGE


@dataclasses.dataclass
class EngineStats:
    """Where the engine's time went (seconds of host wall time, device work included)."""

    iterations: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_chunks: int = 0
    slot_steps: int = 0  # active slots summed over decode chunks
    peak_pages: int = 0  # most pages held at once
    # per decode chunk: (each decoding request's context at its start, steps run, seconds)
    decode_trace: list[tuple[list[int], int, float]] = dataclasses.field(default_factory=list)


class Engine:
    """Holds the parameters, the page pool, the scheduler and the jitted steps."""

    def __init__(self, model: ModelConfig, params, sparsity: SparsityConfig | None = None,
                 cache: CacheConfig | None = None, gates: np.ndarray | None = None, *,
                 scheduler: SchedulerConfig = SchedulerConfig(),
                 backend: Backend = Backend.reference,
                 prefill_path: PrefillPath = PrefillPath.windowed,
                 tuning: KernelTuning = KernelTuning(), tokenizer=None, seed: int = 0,
                 pool_fill: float = 0.0, parallel: ParallelConfig = ParallelConfig()):
        self.model_cfg = model
        self.sparsity = sparsity or SparsityConfig(policy="dense")
        self.cache_cfg = cache or CacheConfig()
        self.parallel = parallel
        check_compatible(model, self.sparsity)
        check_parallel(model, self.cache_cfg, parallel)
        self.mesh = make_mesh(parallel)
        # built first: a backend that cannot run the policy fails before anything is allocated
        self.attention = PagedAttention(self.sparsity, backend, prefill_path, tuning, self.mesh)
        self.params = params if self.mesh is None else shard_params(params, model, self.mesh,
                                                                    parallel)
        self.tokenizer = tokenizer
        self.seed = seed
        self.modes = head_modes(model, self.sparsity, gates)  # [L, K] int8
        self.stream_heads = device_stream_heads(self.modes, parallel.tp)  # static, for prefill
        self.max_pages = math.ceil(self.cache_cfg.max_seq_len / self.sparsity.page_size)
        streaming = self.modes == STREAM
        self.pages = SequencePages(PageAllocator(self._num_pages(streaming), parallel.devices),
                                   streaming, self.sparsity, self.max_pages, parallel.tp)
        self.cache = self._empty_cache(pool_fill)
        self._finished: list[Request] = []  # refused on arrival, reported at the next step
        self.reschedule(scheduler)
        self._modes = jnp.asarray(self.modes)
        self._ids = itertools.count()

    def _num_pages(self, streaming: np.ndarray) -> int:
        """CacheConfig.num_pages, or (0) a pool holding max_batch sequences of max_seq_len
        tokens: on a mesh, each device's block sized for its replica's slots and the heads of
        its device that need the most pages."""
        if self.cache_cfg.num_pages:
            return self.cache_cfg.num_pages
        tp, dp = self.parallel.tp, self.parallel.dp
        per_device = int(pages_per_device(self.cache_cfg.max_seq_len, streaming, self.sparsity,
                                          tp).max())
        return tp * dp * (1 + self.cache_cfg.max_batch // dp * per_device)

    def _empty_cache(self, fill: float):
        def make():
            return empty_cache(self.model_cfg, self.sparsity,
                               num_pages=self.pages.allocator.num_pages,
                               batch=self.cache_cfg.max_batch, max_pages=self.max_pages,
                               fill=fill, kv_dtype=self.cache_cfg.kv_dtype,
                               shards=self.parallel.devices)

        if self.mesh is None:
            return make()
        specs = cache_specs(jax.eval_shape(make))
        return jax.jit(make, out_shardings=shardings(specs, self.mesh))()

    @classmethod
    def for_model(cls, model: LoadedModel, sparsity: SparsityConfig, cache: CacheConfig,
                  **kwargs) -> Engine:
        """An engine for a loaded model under `sparsity`, with the head gates the policy needs
        (`sparsity.head_pattern`, else the model's own pattern: `policy_gates`) and the
        model's tokenizer."""
        gates = policy_gates(sparsity, model.config, model.pattern)
        kwargs.setdefault("tokenizer", model.tokenizer)
        return cls(model.config, model.params, sparsity, cache, gates, **kwargs)

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    def kv_bytes_per_sequence(self, n_tokens: int) -> int:
        return kv_bytes_per_sequence(n_tokens, self.modes == STREAM, self.model_cfg,
                                     self.sparsity, self.cache_cfg.kv_dtype)

    def reschedule(self, config: SchedulerConfig) -> None:
        """Another schedule for the next requests (the compiled steps are kept); counters
        restart."""
        if hasattr(self, "scheduler") and self.has_unfinished():
            raise RuntimeError("reschedule needs an idle engine: requests are still running")
        self.scheduler = Scheduler(config, self.cache_cfg.max_batch, self.pages,
                                   self.sparsity.prefill_chunk)
        r = self.sparsity.reuse_steps
        self.decode_steps = -(-config.decode_steps // r) * r
        self.stats = EngineStats()

    # ---- requests ----

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival: float | None = None) -> str:
        """Queues a prompt (text needs a tokenizer). Raises ValueError naming what is wrong;
        a request the empty pool cannot hold is refused (its output says why)."""
        request = self._request(prompt, params or SamplingParams(), request_id, arrival)
        self._enqueue(request)
        return request.request_id

    def add_requests(self, prompts: list,
                     params: SamplingParams | list[SamplingParams] | None = None) -> list[str]:
        """Queues several prompts (one SamplingParams for all, or one each); every prompt is
        checked before any is queued."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(
            prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give "
                             "one, or one per prompt")
        requests = [self._request(p, s, None, None, where=f"prompts[{i}]")
                    for i, (p, s) in enumerate(zip(prompts, params))]
        for request in requests:
            self._enqueue(request)
        return [r.request_id for r in requests]

    def abort(self, request_id: str) -> bool:
        """Cancels a queued or running request and frees its pages; False if it is unknown or
        already finished."""
        for request in [*self.scheduler.waiting, *self.scheduler.running]:
            if request.request_id == request_id:
                self._finish(request, "abort")
                return True
        return False

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._finished)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Runs every prompt (text or token ids) to its end; one output per prompt, in order
        (`add_requests`)."""
        ids = self.add_requests(prompts, params)
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), disable=not progress, desc="generate", unit="req") as bar:
            while len(results) < len(ids):
                for out in self.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update()
        return [results[i] for i in ids]

    # ---- one iteration ----

    def step(self) -> list[RequestOutput]:
        """Admits, prefills one chunk, decodes one chunk, retires; returns the outputs of the
        requests that changed (finished ones included)."""
        changed: dict[int, Request] = {id(r): r for r in self._finished}
        self._finished = []
        plan = self.scheduler.schedule()
        for request in plan.admitted:
            self.cache = steps.install(self.cache, request.slot, request.table)
        self.stats.peak_pages = max(self.stats.peak_pages, self.pages.allocator.held)
        if plan.prefill:
            start = time.perf_counter()
            changed.update({id(r): r for r in self._prefill(plan.prefill)})
            jax.block_until_ready(self.cache.lengths)  # its time is prefill's, not decode's
            self.stats.prefill_s += time.perf_counter() - start
        decoding = self.scheduler.decoding()
        if decoding:
            contexts = [len(r.prompt_ids) + len(r.tokens) for r in decoding]
            start = time.perf_counter()
            ran = self._decode(decoding)
            seconds = time.perf_counter() - start
            self.stats.decode_s += seconds
            self.stats.decode_trace.append((contexts, ran, seconds))
            changed.update({id(r): r for r in decoding})
        self.stats.iterations += 1
        return [self._output(r) for r in changed.values()]

    def _prefill(self, group: list[Request]) -> list[Request]:
        per_replica = self.scheduler.config.prefill_rows
        rows = per_replica * self.pages.replicas  # replica r's requests in block r
        placed: list[Request | None] = [None] * rows
        for request in group:
            block = self.scheduler.replica(request.slot) * per_replica
            placed[placed.index(None, block)] = request
        width = self.sparsity.prefill_chunk or self.scheduler.bucket(len(group[0].prompt_ids))
        slots = np.full(rows, self.cache_cfg.max_batch, np.int32)  # padding: past the batch
        tokens = np.zeros((rows, width), np.int32)
        new = np.zeros(rows, np.int32)
        for i, request in enumerate(placed):
            if request is None:
                continue
            part = request.prompt_ids[request.prefilled:request.prefilled + width]
            slots[i], new[i] = request.slot, len(part)
            tokens[i, : len(part)] = part
        phase = Phase.PREFILL if group[0].prefilled == 0 else Phase.CHUNK
        logits, self.cache = steps.prefill(
            self.model_cfg, self.attention, self.stream_heads, phase, self.params, self.cache,
            jnp.asarray(slots), jnp.asarray(tokens), jnp.asarray(new), self._modes)
        for i, request in enumerate(placed):
            if request is not None:
                request.prefilled += int(new[i])
        done = [i for i, r in enumerate(placed)
                if r is not None and r.prefilled == len(r.prompt_ids)]
        if done:
            first = np.asarray(steps.first_tokens(self._slot_state(placed), logits))
            now = time.perf_counter()
            for i in done:
                request = placed[i]
                request.metrics = dataclasses.replace(request.metrics, first_token=now)
                self._extend(request, [int(first[i])])
        return [placed[i] for i in done]

    def _decode(self, decoding: list[Request]) -> int:
        """Runs one decode chunk; returns how many steps it ran."""
        rows = [None] * self.cache_cfg.max_batch
        for request in decoding:
            rows[request.slot] = request
        out, _, self.cache = steps.decode(self.model_cfg, self.attention, self.decode_steps,
                                          self.params, self.cache, self._slot_state(rows),
                                          self._modes)
        out = np.asarray(out)
        self.stats.decode_chunks += 1
        self.stats.slot_steps += len(decoding)
        for request in decoding:
            row = out[request.slot]
            self._extend(request, row[row >= 0].tolist())
        return int((out >= 0).sum(axis=1).max())

    def _slot_state(self, rows: list[Request | None]) -> steps.SlotState:
        """Each row's sampling and progress as device arrays (None rows inactive)."""
        width = max([len(r.stops) for r in rows if r is not None] + [1])
        stops = np.full((len(rows), width), -1, np.int32)
        fields = {k: np.zeros(len(rows), t) for k, t in (
            ("last", np.int32), ("count", np.int32), ("active", bool), ("max_tokens", np.int32),
            ("seeds", np.int32), ("temperature", np.float32), ("top_p", np.float32),
            ("top_k", np.int32))}
        for b, r in enumerate(rows):
            if r is None:
                continue
            p = r.params
            stops[b, : len(r.stops)] = r.stops
            for name, value in (("last", r.tokens[-1] if r.tokens else 0),
                                ("count", len(r.tokens)), ("active", r.decoding),
                                ("max_tokens", p.max_tokens), ("seeds", r.seed),
                                ("temperature", p.temperature), ("top_p", p.top_p),
                                ("top_k", p.top_k)):
                fields[name][b] = value
        return steps.SlotState(stops=jnp.asarray(stops),
                               **{k: jnp.asarray(v) for k, v in fields.items()})

    def _extend(self, request: Request, new: list[int]) -> None:
        """Appends generated tokens and finishes the request when one ends it."""
        request.tokens += new
        keep, stop = request.detokenizer.extend(request.tokens, len(new))
        if stop is not None:
            request.tokens = request.tokens[:keep]
            self._finish(request, "stop", stop)
        elif request.tokens and request.tokens[-1] in request.stops:
            self._finish(request, "stop", request.tokens[-1])
        elif len(request.tokens) >= request.params.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, stop_reason=None) -> None:
        slot = request.slot
        self.scheduler.retire(request)
        if slot is not None:  # the row maps nothing until the next request takes it
            self.cache = steps.install(self.cache, slot, np.full(
                self.cache.page_table.shape[1:], TRASH_PAGE, np.int32))
        request.finish_reason, request.stop_reason = reason, stop_reason
        request.metrics = dataclasses.replace(request.metrics, finished=time.perf_counter())
        if reason in ("abort", "refused"):
            self._finished.append(request)

    def _output(self, r: Request) -> RequestOutput:
        done = r.finish_reason is not None
        completion = CompletionOutput(0, r.detokenizer.text, list(r.tokens), r.finish_reason,
                                      r.stop_reason)
        return RequestOutput(r.request_id, r.prompt, r.prompt_ids, [completion], done,
                             r.metrics, r.error)

    # ---- admission checks ----

    def _request(self, prompt, params: SamplingParams, request_id, arrival,
                 where: str = "prompt") -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{where}: sampling params must be a SamplingParams, got "
                             f"{type(params).__name__}")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{where} is text, but the model has no tokenizer: pass token "
                                 "ids")
            text, prompt = prompt, self.tokenizer.encode(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer, and the model has none: "
                             "use stop_token_ids")
        self._validate(list(prompt), params, where)
        stops = params.stop_token_ids
        if not params.ignore_eos and self.eos_token_id is not None:
            stops = (*stops, self.eos_token_id)
        return Request(
            request_id=request_id or f"req-{next(self._ids)}", prompt_ids=list(prompt),
            params=params, stops=stops, seed=self.seed if params.seed is None else params.seed,
            detokenizer=Detokenizer(self.tokenizer, params.stop),
            metrics=RequestMetrics(arrival=time.perf_counter() if arrival is None else arrival),
            prompt=text)

    def _validate(self, prompt: list, params: SamplingParams, where: str) -> None:
        vocab, limit = self.model_cfg.vocab_size, self.cache_cfg.max_seq_len
        if len(prompt) == 0:
            raise ValueError(f"{where} is empty: give at least one token")
        kinds = [t for t in prompt if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
        if kinds:
            raise ValueError(f"{where} holds {kinds[0]!r} ({type(kinds[0]).__name__}): token ids "
                             "must be integers")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{where} holds token {bad[0]} outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_tokens > limit:
            raise ValueError(
                f"{where} has {len(prompt)} tokens; with max_tokens={params.max_tokens} it needs "
                f"{len(prompt) + params.max_tokens} > CacheConfig.max_seq_len={limit}: raise "
                "max_seq_len or shorten the prompt")

    def _enqueue(self, request: Request) -> None:
        needed = int(self.pages.per_device(request.needed_tokens).max())
        pool = self.pages.allocator.shard_capacity
        if needed > pool:
            where = " one device's share of" if self.mesh is not None else ""
            request.error = (f"the request needs {needed} pages and{where} the whole pool has "
                             f"{pool}: raise CacheConfig.num_pages, or shorten the prompt or "
                             "max_tokens")
            self._finish(request, "refused")
        else:
            self.scheduler.add(request)
