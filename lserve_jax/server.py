"""An OpenAI-compatible HTTP server (FastAPI + uvicorn): `/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/health`, with server-sent-event streaming.

The engine runs in one background thread (`AsyncEngine`); handlers hand it requests through
a queue and receive outputs on asyncio queues. A request the engine rejects is a 400 with a
JSON error naming the field; a client that disconnects cancels its request, whose pages go
back to the pool at the engine's next iteration.

    lserve serve testbed --sparsity.policy lserve --port 8000
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lserve_jax.engine import Engine, RequestOutput
from lserve_jax.llm import LLM
from lserve_jax.sampling import SEED_LIMIT, SamplingParams


class AsyncEngine:
    """Drives an `Engine` from one thread: requests are added and aborted between
    iterations; each request's outputs go to its asyncio queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="lserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs (cumulative; the last one `finished`). Raises
        ValueError at the first iteration when the engine rejects the request. Closing the
        iterator before the end aborts the request."""
        request_id = uuid.uuid4().hex
        sink: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", request_id, prompt, params, asyncio.get_running_loop(), sink))
        finished = False
        try:
            while not finished:
                item = await sink.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            while True:
                try:
                    command = self._commands.get(block=block)
                except queue.Empty:
                    break
                self._apply(*command)
                block = False
            try:
                outs = self.engine.step()
            except Exception as err:  # every running request fails with it; the thread lives
                self._fail_all(RuntimeError(f"the engine failed: {err!r}"))
                continue
            for out in outs:
                self._deliver(out.request_id, out)
                if out.finished:
                    self._sinks.pop(out.request_id, None)

    def _fail_all(self, err: Exception) -> None:
        for request_id in list(self._sinks):
            self._deliver(request_id, err)
            self.engine.abort(request_id)
        self._sinks.clear()

    def _apply(self, kind: str, request_id: str, *args) -> None:
        if kind == "abort":
            self.engine.abort(request_id)
            self._sinks.pop(request_id, None)
            return
        prompt, params, loop, sink = args
        self._sinks[request_id] = (loop, sink)
        try:
            self.engine.add_request(prompt, params, request_id=request_id)
        except Exception as err:  # ValueError: a bad request (400); anything else: 500
            self._deliver(request_id, err)
            self._sinks.pop(request_id, None)

    def _deliver(self, request_id: str, item) -> None:
        if request_id in self._sinks:
            loop, sink = self._sinks[request_id]
            loop.call_soon_threadsafe(sink.put_nowait, item)


class _Sampling(BaseModel):
    """The sampling fields both endpoints share (OpenAI's, plus vLLM's extensions top_k,
    ignore_eos and stop_token_ids)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False

    def sampling(self) -> SamplingParams:
        """A request without a seed draws its own (the engine's seed would give every such
        request with the same prompt the same sample)."""
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        seed = random.randrange(SEED_LIMIT) if self.seed is None else self.seed
        return SamplingParams(max_tokens=self.max_tokens or 16, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=seed,
                              stop=self.stop or (), stop_token_ids=self.stop_token_ids,
                              ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": status}}, status_code=status)


def _param_of(message: str) -> str | None:
    """The field an error message names (`SamplingParams.top_k=...`, `prompt holds ...`)."""
    head = message.split("=")[0].split(" ")[0].split(":")[0]
    return head.removeprefix("SamplingParams.") or None


def build_app(llm: LLM, served_model_name: str | None = None) -> fastapi.FastAPI:
    """The ASGI app serving `llm` under `served_model_name` (default: the model's name)."""
    name = served_model_name or llm.name
    engine = AsyncEngine(llm.engine)
    tokenizer = llm.tokenizer
    app = fastapi.FastAPI(title="lserve_jax", version="0.1.0")
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0]
        if first["type"] == "json_invalid":  # its loc ends at the offending character
            return _error(400, f"body is not valid JSON (at character {first['loc'][-1]})",
                          "body")
        field = ".".join(str(x) for x in first["loc"] if x != "body") or "body"
        return _error(400, f"{field}: {first['msg']}", field)

    @app.get("/health")
    async def health():
        e = llm.engine
        return {"status": "ok", "running": len(e.scheduler.running),
                "waiting": len(e.scheduler.waiting), "free_pages": e.pages.allocator.free,
                "total_pages": e.pages.allocator.capacity}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "lserve_jax"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: fastapi.Request):
        return await _serve(body, body.prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: fastapi.Request):
        if tokenizer is None:
            return _error(400, f"model {name!r} has no tokenizer: chat needs one; use "
                               "/v1/completions with token ids", "messages")
        return await _serve(body, _chat_prompt(tokenizer, body.messages), request, chat=True)

    async def _serve(body: _Sampling, prompt, request: fastapi.Request, chat: bool):
        if body.model != name:
            return _error(404, f"model {body.model!r} does not exist: this server serves "
                               f"{name!r}", "model")
        try:
            params = body.sampling()
        except ValueError as err:
            return _error(400, str(err), _param_of(str(err)))
        stream = engine.generate(prompt, params)
        try:  # a client that leaves while its request waits for a slot cancels it too
            first = await _unless_gone(anext(stream), request)
        except ValueError as err:
            return _error(400, str(err), _param_of(str(err)))
        if first is None:
            await stream.aclose()
            return _error(499, "client closed the request")
        if first.finish_reason == "refused":
            return _error(400, first.error, "max_tokens")
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "created": int(time.time()), "model": name}
        if body.stream:
            return StreamingResponse(_events(first, stream, meta, chat, params.stop),
                                     media_type="text/event-stream")
        last = await _unless_gone(_last(first, stream), request)
        if last is None:  # the request's generator aborted it as it unwound
            return _error(499, "client closed the request")
        return _response(last, meta, chat)

    return app


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The tokenizer's chat template when it has one, else 'role: content' lines."""
    turns = [m.model_dump() for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


async def _unless_gone(awaitable, request: fastapi.Request):
    """The awaitable's result, or None (the awaitable cancelled) once the client has gone:
    checked every 0.25 s however often the engine produces outputs."""
    task = asyncio.ensure_future(awaitable)
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return None
    return task.result()


async def _last(first: RequestOutput, stream) -> RequestOutput:
    last = first
    async for last in stream:
        pass
    return last


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many of `text`'s last characters are not streamed yet: any end that could begin a
    stop string (which would cut it off), and replacement characters of a character whose
    bytes are still arriving (byte-level tokenizers)."""
    partial = len(text) - len(text.rstrip("\ufffd"))
    return max([partial] + [n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])])


def _usage(out: RequestOutput) -> dict:
    n_in, n_out = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _response(out: RequestOutput, meta: dict, chat: bool) -> dict:
    text = out.text or ""
    choice = {"index": 0, "finish_reason": out.finish_reason, "token_ids": out.token_ids}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return {**meta, "object": "chat.completion" if chat else "text_completion",
            "choices": [choice], "usage": _usage(out)}


async def _events(first: RequestOutput, stream, meta: dict, chat: bool,
                  stop: tuple[str, ...] = ()):
    """Server-sent events: one chunk of new text per engine output (less any end that may
    begin a stop string), then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent_text, sent_tokens, out = 0, 0, first
    try:
        while True:
            text = out.text or ""
            shown = len(text) if out.finished else len(text) - _held_back(text, stop)
            delta, new_ids = text[sent_text:shown], out.token_ids[sent_tokens:]
            sent_text, sent_tokens = max(sent_text, shown), len(out.token_ids)
            choice = {"index": 0, "finish_reason": out.finish_reason if out.finished else None,
                      "token_ids": new_ids}
            if chat:
                choice["delta"] = {"role": "assistant", "content": delta}
            else:
                choice.update(text=delta, logprobs=None)
            chunk = {**meta, "object": kind, "choices": [choice]}
            if out.finished:
                chunk["usage"] = _usage(out)
            yield f"data: {json.dumps(chunk)}\n\n"
            if out.finished:
                break
            out = await anext(stream)
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()  # a client gone mid-stream aborts the request


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None) -> None:
    uvicorn.run(build_app(llm, served_model_name), host=host, port=port, log_level="info")
