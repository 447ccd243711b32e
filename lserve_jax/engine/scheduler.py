"""The host-side scheduler: a waiting queue, a fixed number of slots, and what each iteration
runs (plain Python, nano-vllm's shape).

Each iteration `schedule()` admits waiting requests in arrival order while a slot and the pages
for prompt + max_tokens are free (the request at the head waits for pages rather than being
overtaken; with data-parallel replicas it goes to the least busy replica that holds it) and
picks up to `prefill_rows` prompts to prefill one chunk of; after the prefill, `decoding()`
lists the requests that decode. A request that finishes leaves its slot and pages at once
(`retire`), so a waiting one takes them at the next iteration. The `wave` schedule
admits only into an empty batch and decodes only once the whole batch is prefilled: static
batching, the baseline.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from lserve_jax.cache.allocator import SequencePages
from lserve_jax.config import SchedulerConfig
from lserve_jax.engine.outputs import Detokenizer, RequestMetrics
from lserve_jax.sampling import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[int, ...]  # stop token ids, the end-of-sequence token included unless ignored
    seed: int
    detokenizer: Detokenizer
    metrics: RequestMetrics
    prompt: str | None = None
    slot: int | None = None
    pages: dict[int, list[int]] | None = None  # by pool shard, while admitted
    table: np.ndarray | None = None  # [L, K, M] int32 page-table row, while admitted
    prefilled: int = 0  # prompt tokens in the cache
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None

    @property
    def needed_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids) and self.finish_reason is None


@dataclasses.dataclass(frozen=True)
class Plan:
    """One iteration's work."""

    admitted: list[Request]  # took a slot this iteration (their rows must be installed)
    prefill: list[Request]  # prompts to advance by one chunk (all starting, or all resuming)


class Scheduler:
    def __init__(self, config: SchedulerConfig, slots: int, pages: SequencePages,
                 chunk: int):
        self.config = config
        self.pages = pages
        self.chunk = chunk  # prompt tokens per prefill call (0: the whole prompt)
        self.slots: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> Plan:
        admitted = self._admit()
        running = self.running
        resuming = [r for r in running if 0 < r.prefilled < len(r.prompt_ids)]
        starting = [r for r in running if r.prefilled == 0]
        group = resuming or starting  # one phase per call (PREFILL or CHUNK)
        if group and not self.chunk:  # whole prompts: one padded length per call
            bucket = self.bucket(len(group[0].prompt_ids))
            group = [r for r in group if self.bucket(len(r.prompt_ids)) == bucket]
        return Plan(admitted, group[: self.config.prefill_rows])

    def decoding(self) -> list[Request]:
        """The requests to decode, once this iteration's prefill has run."""
        running = self.running
        if self.config.schedule == "wave" and any(not r.decoding for r in running):
            return []  # a wave decodes once all of it is prefilled
        return [r for r in running if r.decoding]

    def bucket(self, n: int) -> int:
        size = self.config.prefill_bucket
        return -(-n // size) * size

    def _admit(self) -> list[Request]:
        if self.config.schedule == "wave" and self.running:
            return []
        admitted = []
        while self.waiting:
            request = self.waiting[0]
            slot = self._free_slot(request.needed_tokens)
            if slot is None:
                break  # waits for a slot or pages: what can never fit was refused on arrival
            request.table, request.pages = self.pages.reserve(request.needed_tokens,
                                                              self.replica(slot))
            self.waiting.popleft()
            request.slot = slot
            self.slots[slot] = request
            admitted.append(request)
        return admitted

    def replica(self, slot: int) -> int:
        """The data-parallel replica serving `slot` (0 on one device or a tp-only mesh)."""
        return slot // (len(self.slots) // self.pages.replicas)

    def _free_slot(self, n_tokens: int) -> int | None:
        """A free slot of the least busy replica whose devices hold `n_tokens` now."""
        busy: dict[int, int] = {}
        for slot, request in enumerate(self.slots):
            busy[self.replica(slot)] = busy.get(self.replica(slot), 0) + (request is not None)
        for replica in sorted(busy, key=busy.get):
            free = [s for s, r in enumerate(self.slots) if r is None and
                    self.replica(s) == replica]
            if free and self.pages.fits(n_tokens, replica):
                return free[0]
        return None

    def retire(self, request: Request) -> None:
        """Frees the request's slot and pages (it finished, stopped or was cancelled)."""
        if request.slot is not None:
            self.slots[request.slot] = None
            self.pages.release(request.pages)
            request.slot, request.pages, request.table = None, None, None
        elif request in self.waiting:
            self.waiting.remove(request)
