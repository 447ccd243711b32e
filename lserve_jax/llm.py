"""The offline API, in vLLM's convention:

    from lserve_jax import LLM, SamplingParams
    llm = LLM("testbed", sparsity=SparsityConfig(policy="lserve"))
    for out in llm.generate(prompts, SamplingParams(max_tokens=64)):
        print(out.outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Iterator

from lserve_jax.attention import KernelTuning
from lserve_jax.config import (Backend, CacheConfig, ParallelConfig, PrefillPath,
                               SchedulerConfig, SparsityConfig, WeightDtype)
from lserve_jax.engine import Engine, RequestOutput
from lserve_jax.model import LoadedModel, load_model
from lserve_jax.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """A model under one sparsity policy, ready to generate. `model`: a preset (random
    weights), `testbed`, a checkpoint directory, a local HF directory, or a `LoadedModel`.
    The policy defaults to dense; static policies (duo, lserve) take the model's own head
    pattern or `sparsity.head_pattern`. `weight_dtype="fp8"` quantizes the linear layers at
    load; `cache.kv_dtype` quantizes the KV cache. `parallel` spreads the model over a
    ('dp', 'tp') mesh of devices (`lserve_jax.parallel`)."""

    def __init__(self, model: str | LoadedModel = "tiny",
                 sparsity: SparsityConfig = SparsityConfig(policy="dense"),
                 cache: CacheConfig = CacheConfig(),
                 backend: Backend | str = Backend.reference,
                 scheduler: SchedulerConfig = SchedulerConfig(),
                 prefill_path: PrefillPath | str = PrefillPath.windowed,
                 tuning: KernelTuning = KernelTuning(), seed: int = 0,
                 weight_dtype: WeightDtype = "auto",
                 parallel: ParallelConfig = ParallelConfig()):
        if not isinstance(model, str) and weight_dtype != "auto":
            raise ValueError("weight_dtype applies when LLM loads the model: pass a name or "
                             "directory, or load it with load_model(..., weight_dtype)")
        self.model = load_model(model, seed, weight_dtype) if isinstance(model, str) else model
        self.name = model if isinstance(model, str) else "model"
        self.engine = Engine.for_model(self.model, sparsity, cache, scheduler=scheduler,
                                       backend=Backend(backend),
                                       prefill_path=PrefillPath(prefill_path), tuning=tuning,
                                       seed=seed, parallel=parallel)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt (text, or token ids), in order."""
        return self.engine.generate(_as_list(prompts), sampling_params, progress=use_tqdm)

    def stream(self, prompts: Prompt | list[Prompt],
               sampling_params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Yields a `RequestOutput` whenever a request has new tokens (cumulative: tokens and
        text so far; `finished` on its last one). Requests run together, as in `generate`;
        `request_id` tells them apart (`req-N`, N counting up from this LLM's first request).
        Closing the iterator early cancels what is still running."""
        pending = set(self.engine.add_requests(_as_list(prompts), sampling_params))
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for request_id in pending:
                self.engine.abort(request_id)


def _as_list(prompts) -> list[Prompt]:
    """One prompt (text, or a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and
                                    not isinstance(prompts[0], (str, list))):
        return [prompts]
    return list(prompts)
