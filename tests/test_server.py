"""The OpenAI-compatible server, end to end over HTTP: one real server (uvicorn in a thread, the
tiny HF Llama with its character tokenizer) for the whole module, driven by the official
`openai` client and, for malformed bodies, by raw `httpx` requests."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from lserve_jax.config import CacheConfig, SchedulerConfig
from lserve_jax.llm import LLM
from lserve_jax.server import build_app

pytestmark = pytest.mark.xdist_group("server")  # one server for the module, on one worker

MODEL = "tiny"
FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_llama"
DECODE_STEPS = 4  # tokens per engine iteration after the first: a stream's chunk size


@pytest.fixture(scope="module")
def served():
    """(base url, LLM) of a running server; the jitted steps are compiled before any test."""
    llm = LLM(str(FIXTURE), cache=CacheConfig(max_seq_len=256, max_batch=2, num_pages=33),
              scheduler=SchedulerConfig(decode_steps=DECODE_STEPS))
    server = uvicorn.Server(uvicorn.Config(build_app(llm, MODEL), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    _client(base).completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    yield base, llm
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(served):
    return _client(served[0])


@pytest.fixture(scope="module")
def http(served):
    """Raw requests (one client: building one costs ~50 ms)."""
    with httpx.Client(base_url=served[0], timeout=10) as http:
        yield http


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)


def _ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def _decode(llm: LLM, ids: list[int]) -> str:
    return llm.tokenizer.decode(ids, skip_special_tokens=True)


def _health(http: httpx.Client) -> dict:
    resp = http.get("/health")
    assert resp.status_code == 200
    return resp.json()


def _wait_idle(http: httpx.Client, timeout: float = 20) -> dict:
    """/health once nothing runs or waits and every page is back in the pool."""
    deadline = time.monotonic() + timeout
    while True:
        health = _health(http)
        if (health["free_pages"] == health["total_pages"] and health["running"] == 0
                and health["waiting"] == 0):
            return health
        assert time.monotonic() < deadline, f"the engine did not go idle: {health}"
        time.sleep(0.05)


def _wait_for(condition, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _complete(client, prompt, max_tokens: int, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                     **kwargs)


def test_completion_is_greedy_and_seeded_sampling_repeats(served, client):
    _, llm = served
    resp = _complete(client, "Hello", 8)
    assert resp.model == MODEL and resp.object == "text_completion"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    ids = _ids(choice)
    assert choice.text and choice.text == _decode(llm, ids)
    if choice.finish_reason == "length":
        assert len(ids) == 8
    else:
        assert choice.finish_reason == "stop" and ids[-1] == llm.tokenizer.eos_token_id
        assert len(ids) < 8
    usage = resp.usage
    assert usage.prompt_tokens == len(llm.tokenizer.encode("Hello"))
    assert usage.completion_tokens == len(ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    again = _complete(client, "Hello", 8).choices[0]
    assert (again.text, _ids(again)) == (choice.text, ids)

    def sampled(seed: int) -> list[int]:
        out = _complete(client, "Hello", 12, temperature=1.0, seed=seed,
                        extra_body={"ignore_eos": True})
        return _ids(out.choices[0])

    first = sampled(3)
    assert len(first) == 12 and sampled(3) == first
    assert any(sampled(seed) != first for seed in (4, 5))


def test_unseeded_sampling_varies(client):
    """Without a seed each sampled request draws its own (OpenAI's and vLLM's behaviour):
    sending a prompt twice gives two samples, not one sample twice."""
    outs = [_ids(_complete(client, "Hello", 12, temperature=1.0,
                           extra_body={"ignore_eos": True}).choices[0]) for _ in range(3)]
    assert len({tuple(o) for o in outs}) > 1


def test_chat_uses_role_lines_without_a_template(served, client):
    _, llm = served
    assert not getattr(llm.tokenizer, "chat_template", None)
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0)
    assert resp.object == "chat.completion" and len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == _decode(llm, _ids(choice))
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens == len(llm.tokenizer.encode("user: Hi\nassistant:"))
    assert resp.usage.completion_tokens == len(_ids(choice)) <= 6


def test_stream_concatenates_to_the_unstreamed_answer(client):
    full = _complete(client, "Hello", 10).choices[0]
    chunks = list(_complete(client, "Hello", 10, stream=True))
    assert len(chunks) >= 2  # 1 + DECODE_STEPS tokens, then DECODE_STEPS per chunk
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert [t for c in chunks for t in _ids(c.choices[0])] == _ids(full)
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == full.finish_reason

    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                           temperature=0, extra_body={"ignore_eos": True})
    parts = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}))
    assert len(parts) >= 2
    assert "".join(p.choices[0].delta.content or "" for p in parts) == \
        whole.choices[0].message.content
    assert [p.choices[0].finish_reason for p in parts[:-1]] == [None] * (len(parts) - 1)
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_stream_holds_back_a_possible_stop_string(served, client):
    """A stop string that starts inside one streamed chunk and ends in the next: the stream
    must not send text the stop string later cuts off."""
    _, llm = served
    ids = _ids(_complete(client, "Hello", 12, extra_body={"ignore_eos": True}).choices[0])
    first_chunk = 1 + DECODE_STEPS  # tokens of the first streamed chunk
    # the shortest run of tokens from the first chunk's last one that only occurs there
    end = next(k for k in range(first_chunk + 1, len(ids) + 1)
               if _decode(llm, ids[first_chunk - 1:k]) not in _decode(llm, ids[:k - 1]))
    stop = _decode(llm, ids[first_chunk - 1:end])
    full = _complete(client, "Hello", 12, stop=stop, extra_body={"ignore_eos": True}).choices[0]
    assert full.finish_reason == "stop"
    assert len(full.text) < len(_decode(llm, ids[:first_chunk]))  # cut inside the first chunk
    chunks = list(_complete(client, "Hello", 12, stop=stop, stream=True,
                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_queue_and_match_sequential(client):
    prompts = ["Hello", "abc", "The cat", "xyz 12"]  # 4 requests, 2 slots: two wait
    alone = [_ids(_complete(client, p, 8).choices[0]) for p in prompts]
    barrier = threading.Barrier(len(prompts))

    def run(prompt):
        barrier.wait()
        return _ids(_complete(client, prompt, 8).choices[0])

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone


def _slow_engine(monkeypatch, llm) -> list[bool]:
    """Each engine iteration takes >= 30 ms (so a request of 200 tokens still runs a second
    after its client leaves); returns what each `Engine.abort` call returned."""
    engine, aborted = llm.engine, []
    step, abort = engine.step, engine.abort

    def slow_step():
        time.sleep(0.03)
        return step()

    def spy_abort(request_id):
        aborted.append(abort(request_id))
        return aborted[-1]

    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(engine, "abort", spy_abort)
    return aborted


def test_closed_stream_frees_its_pages(served, client, http, monkeypatch):
    _, llm = served
    aborted = _slow_engine(monkeypatch, llm)
    stream = _complete(client, "Hello", 200, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    assert next(chunks).choices[0].text
    next(chunks)
    stream.close()
    health = _wait_idle(http)
    _wait_for(lambda: aborted)  # the spy records abort's answer after the pages are back
    assert aborted == [True]  # cancelled while running, not finished
    assert health["free_pages"] == llm.engine.pages.allocator.num_pages - 1
    monkeypatch.undo()
    assert len(_ids(_complete(client, "Hello", 4).choices[0])) == 4


def test_client_leaving_a_plain_request_aborts_it(served, http, monkeypatch):
    _, llm = served
    aborted = _slow_engine(monkeypatch, llm)
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", timeout=0.3,
                  json={"model": MODEL, "prompt": "Hello", "max_tokens": 200,
                        "temperature": 0, "ignore_eos": True})
    _wait_idle(http)
    _wait_for(lambda: aborted)
    assert aborted == [True]


BAD_BODIES = [
    ({"prompt": "Hello", "max_tokens": 4}, 400, "model", None),
    ({"model": MODEL, "max_tokens": 4}, 400, "prompt", None),
    ({"model": MODEL, "prompt": "Hello", "temperature": -1}, 400, "temperature", None),
    ({"model": MODEL, "prompt": "Hello", "top_k": -1}, 400, "top_k", None),
    ({"model": MODEL, "prompt": "Hello", "top_p": 0}, 400, "top_p", None),
    ({"model": MODEL, "prompt": "Hello", "seed": -1}, 400, "seed", None),
    ({"model": MODEL, "prompt": "Hello", "stop_token_ids": [-1]}, 400, "stop_token_ids", None),
    ({"model": MODEL, "prompt": "Hello", "n": 2}, 400, "n", None),
    ({"model": "gpt-4", "prompt": "Hello"}, 404, "model", "gpt-4"),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, "prompt", "vocabulary"),
    ({"model": MODEL, "prompt": []}, 400, "prompt", "empty"),
    ({"model": MODEL, "prompt": "Hello", "max_tokens": 10000}, 400, "prompt", "max_seq_len"),
]


def test_malformed_bodies_are_client_errors(client, http):
    url = "/v1/completions"
    resp = http.post(url, content=b'{"model": "tiny", "prompt": ',
                     headers={"content-type": "application/json"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "body" and "JSON" in error["message"] and error["code"] == 400
    for body, status, param, words in BAD_BODIES:
        resp = http.post(url, json=body)
        assert resp.status_code == status, (body, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and param in error["message"], (body, error)
        assert words is None or words in error["message"], (body, error)
    chat = http.post("/v1/chat/completions",
                     json={"model": MODEL, "messages": [{"role": "robot", "content": "Hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2)
    _wait_idle(http)  # nothing rejected holds a slot or a page
    ok = http.post(url, json={"model": MODEL, "prompt": "Hello", "max_tokens": 3,
                              "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 3


def test_models_and_health(served, client, http):
    _, llm = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = _health(http)
    assert health["status"] == "ok"
    assert health["total_pages"] == llm.engine.pages.allocator.num_pages - 1
