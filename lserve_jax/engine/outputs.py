"""What a request returns (vLLM's shape: `RequestOutput.outputs[0].text`), its timings, and the
incremental detokenizer that finds stop strings."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Seconds, from the engine's clock (`time.perf_counter`)."""

    arrival: float
    first_token: float | None = None  # when the first generated token reached the host
    finished: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    def time_per_output_token(self, n_tokens: int) -> float | None:
        """Mean seconds between output tokens after the first (None below two tokens)."""
        if self.finished is None or self.first_token is None or n_tokens < 2:
            return None
        return (self.finished - self.first_token) / (n_tokens - 1)


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str | None  # None without a tokenizer
    token_ids: list[int]  # generated tokens (a stop token, when hit, is the last one)
    finish_reason: str | None  # "stop" | "length" | "abort" | "refused"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # why a refused request was refused

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class Detokenizer:
    """A request's text so far, and where a stop string ends it. Decodes the whole output each
    time (plain and exact; outputs are short next to the model's work per token)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = "" if tokenizer is not None else None

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def extend(self, tokens: list[int], new: int) -> tuple[int, str | None]:
        """The output `tokens` grew by its last `new` tokens: updates the text and returns (how
        many tokens to keep, the stop string that ended it or None). The text of a stopped
        output ends before its stop string."""
        if self.tokenizer is None:
            return len(tokens), None
        for keep in range(len(tokens) - new + 1, len(tokens) + 1) if self.stop else ():
            text = self.decode(tokens[:keep])
            hits = [(text.find(s), s) for s in self.stop if s in text]
            if hits:
                at, stop = min(hits)
                self.text = text[:at]
                return keep, stop
        self.text = self.decode(tokens)
        return len(tokens), None
