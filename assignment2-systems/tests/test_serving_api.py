"""Issue 19, the HTTP layer: a real `AsyncLLMEngine` (random-weight tiny model, CPU) behind a real uvicorn server
on a loopback port, driven by the official `openai` client (completions, chat, streaming) and by raw httpx for
what a client library would not send. Reference outputs come from a synchronous `LLMEngine` over the same
weights, run offline."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from cs336_basics.cli_support import run_command
from cs336_systems.serving import serve_cli
from cs336_systems.serving.api import build_app, sse, templated
from cs336_systems.serving.chat import render_hf, render_plain
from cs336_systems.serving.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from cs336_systems.serving.loader import tiny_served_model
from cs336_systems.serving.params import CompletionOutput, SamplingParams
from cs336_systems.serving.protocol import ChatChunkChoice, ChatCompletionChunk, Completion, CompletionChoice, Delta
from cs336_systems.serving.testing import wait_until

MODEL = "tiny"
CONTEXT = 512  # long enough that a request can still be running when its client leaves
CONFIG = dict(device="cpu", block_size=8, num_blocks=512, max_num_seqs=64, cuda_graphs=False)
API_KEY = "sekrit"


# ------------------------------------------------------------------------------------------------ fixtures
class LiveServer:
    """`build_app(engine)` served by uvicorn on a free loopback port, on a background thread."""

    def __init__(self, engine: AsyncLLMEngine, http: dict[str, str] | None = None, **app_kwargs):
        self.engine = engine
        self.http = http or {}
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(engine, **app_kwargs), log_level="warning",
                                                    lifespan="off", **self.http))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, what="uvicorn to start")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             timeout=60, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncLLMEngine]:
    eng = AsyncLLMEngine.from_served(tiny_served_model(seed=0, name=MODEL, context_length=CONTEXT),
                                     EngineConfig(**CONFIG))
    eng.start()
    yield eng
    eng.shutdown()


# uvicorn's pure-Python stack and the C one (`serve`'s default when installed, as in the project's environment):
# every test on `live` runs on both, since streaming, disconnects and errors go through different code in each.
HTTP_STACKS = {"asyncio+h11": {"loop": "asyncio", "http": "h11"},
               "uvloop+httptools": {"loop": "uvloop", "http": "httptools"}}


@pytest.fixture(scope="module", params=list(HTTP_STACKS))
def live(engine, request) -> Iterator[LiveServer]:
    server = LiveServer(engine, http=HTTP_STACKS[request.param])
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference() -> LLMEngine:
    """The same weights in a synchronous engine: what one request alone, unstreamed, produces."""
    return LLMEngine(tiny_served_model(seed=0, name=MODEL, context_length=CONTEXT), EngineConfig(**CONFIG))


def offline(reference: LLMEngine, prompt: str, **params) -> CompletionOutput:
    ids = reference.served.tokenizer.encode(prompt)
    return reference.generate([ids], SamplingParams(temperature=0.0, **params))[0].outputs[0]


def idle(engine: AsyncLLMEngine) -> bool:
    s = engine.stats()
    return s.blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# ------------------------------------------------------------------------------------ the openai client works
def test_models_completions_chat_and_streams_through_the_openai_client(live, reference):
    client = live.client()
    (card,) = client.models.list().data
    assert card.id == MODEL
    prompt = "Hello there"
    want = offline(reference, prompt, max_tokens=12, ignore_eos=True)

    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    (choice,) = r.choices
    assert (choice.text, choice.finish_reason) == (want.text, "length")
    prompt_ids = reference.served.tokenizer.encode(prompt)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(prompt_ids), 12, len(prompt_ids) + 12)

    text, finishes, usage = "", [], None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            text += c.text
            finishes.append(c.finish_reason)
    assert text == want.text and finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert usage.completion_tokens == 12 and usage.prompt_tokens == len(prompt_ids)

    # the same prompt as token ids, and a batch of prompts with n samples each: choice = prompt * n + sample
    r = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text
    r = client.completions.create(model=MODEL, prompt=[prompt, "Bye"], n=2, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    bye = offline(reference, "Bye", max_tokens=4, ignore_eos=True).text
    assert [c.text for c in r.choices] == [want.text[: len(r.choices[0].text)]] * 2 + [bye, bye]
    assert r.usage.prompt_tokens == len(prompt_ids) + 3 and r.usage.completion_tokens == 16


def test_chat_uses_the_plain_template_streamed_or_not(live, reference):
    client = live.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = render_plain(messages)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"
    want = offline(reference, prompt, max_tokens=10, ignore_eos=True)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want.text, "length")
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_raw_event_stream_format(live):
    with httpx.Client(base_url=live.url, timeout=60) as http, http.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "abc", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 3  # the extension: ids per chunk
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # no include_usage: no usage chunk


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "abc"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "abc"}]}),
])
def test_streamed_text_chunks_share_the_stream_id_and_timestamp(live, path, body):
    with httpx.Client(base_url=live.url, timeout=60) as http, http.stream("POST", path, json={
            "model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **body}) as response:
        chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    assert len(chunks) > 3
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {(chunks[0]["id"], chunks[0]["created"], MODEL)}


def _completion_render(choice: int, text: str, token_ids: list[int] | None, finish: str | None) -> str:
    c = CompletionChoice(index=choice, text=text, finish_reason=finish, token_ids=token_ids)
    return sse(Completion(id="cmpl-1", created=1_800_000_000, model='a "model"/name', choices=[c]))


def _chat_render(choice: int, text: str, token_ids: list[int] | None, finish: str | None) -> str:
    c = ChatChunkChoice(index=choice, delta=Delta(content=text) if text else Delta(), finish_reason=finish,
                        token_ids=token_ids)
    return sse(ChatCompletionChunk(id="chatcmpl-1", created=1_800_000_000, model="m", choices=[c]))


@pytest.mark.parametrize("render", [_completion_render, _chat_render])
def test_templated_chunks_are_byte_for_byte_what_pydantic_renders(render):
    fast = templated(render)
    assert fast is not render  # the template was found
    calls = []
    counted = templated(lambda *args: calls.append(args) or render(*args))
    calls.clear()
    counted(0, "a", None, None), counted(0, "a", [1, 2], None)
    assert calls == []  # both kinds of text chunk come from the templates, not from pydantic
    rng = random.Random(0)
    alphabet = ["a", " ", '"', "\\", "\n", "\t", "\r", "\x00", "\x1f", "\x7f", "/", "<", "&", "'", "é", "中", "😀",
                "\u2028", "\ufffd", "cs336-text-mark-9f4e2b", "-7364921058"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        choice = rng.choice([0, 1, 7, 255, rng.randint(0, 10**6)])
        assert fast(choice, text, None, None) == render(choice, text, None, None), (choice, text)
        ids = [rng.choice([0, 1, 9, 255, 8_462_019_377, rng.randint(0, 10**6)]) for _ in range(rng.randint(0, 5))]
        assert fast(choice, text, ids, None) == render(choice, text, ids, None), (choice, text, ids)
    # every other call is rendered by pydantic itself
    for args in [(0, "", None, None), (1, "x", None, "stop"), (2, "", [1, 2], None), (3, "", [], "length"),
                 (4, "z", [5], "stop")]:
        assert fast(*args) == render(*args)


def test_templated_falls_back_when_the_markers_are_not_found_once():
    def constant(choice: int, text: str, token_ids: list[int] | None, finish: str | None) -> str:
        return "data: {}\n\n"

    def twice(choice: int, text: str, token_ids: list[int] | None, finish: str | None) -> str:
        return sse({"a": text, "b": text, "index": choice})

    assert templated(constant) is constant and templated(twice) is twice


def test_seeded_samples_map_to_choices_and_repeat(live):
    client = live.client()

    def ask():
        return client.completions.create(model=MODEL, prompt="Once", n=3, max_tokens=6, temperature=1.0, seed=7,
                                         extra_body={"ignore_eos": True})

    a, b = ask(), ask()
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 18


# ------------------------------------------------------------------------------- stop strings and max_tokens
def test_stop_strings_cut_the_text_right_before_the_first_stop(live, reference):
    client = live.client()
    prompt = "hello there"
    full = offline(reference, prompt, max_tokens=40, ignore_eos=True).text
    # a stop string from the plain-ASCII part of the greedy text, whose first occurrence is a few characters in
    start = next(i for i in range(3, len(full) - 2)
                 if full[i : i + 2].isascii() and full[i : i + 2].isprintable() and full.find(full[i : i + 2]) >= 3)
    stop = full[start : start + 2]
    at = full.find(stop)
    # and one that first appears only later: whichever stop string comes first ends the text
    later = next(full[i : i + 3] for i in range(len(full) - 3, at, -1)
                 if full[i : i + 3].isascii() and full[i : i + 3].isprintable() and full.find(full[i : i + 3]) > at)
    cut = full[:at]
    for stream in (False, True):
        kwargs = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        for stops in (stop, [later, stop]):
            if stream:
                text, finish = "", None
                for chunk in client.completions.create(stop=stops, stream=True, **kwargs):
                    for c in chunk.choices:
                        text += c.text
                        finish = c.finish_reason or finish
            else:
                choice = client.completions.create(stop=stops, **kwargs).choices[0]
                text, finish = choice.text, choice.finish_reason
            assert (text, finish) == (cut, "stop"), (stops, stream)


def test_max_tokens_and_eos_end_generations(live, reference):
    client = live.client()
    prompt = "hello there"
    for max_tokens in (1, 5):
        want = offline(reference, prompt, max_tokens=max_tokens)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (
            want.text, want.finish_reason, len(want.token_ids))
    # without ignore_eos this prompt's greedy text ends at the end-of-text token: finish_reason "stop"
    want = offline(reference, prompt, max_tokens=100)
    assert want.finish_reason == "stop" and want.token_ids[-1] == 256
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=100, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, "stop")
    assert "<|endoftext|>" not in r.choices[0].text
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=0,
                                       max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 3


# ------------------------------------------------------------------------------------------- bad requests
LONG = list(range(65, 91)) * 20  # 520 token ids > CONTEXT
BAD = [
    # (path, raw body or JSON, status, param)
    ("/v1/completions", b'{"model": "tiny", "prompt": "x",', 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", [1, 2], 422, None),
    ("/v1/completions", {"model": MODEL}, 422, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "8"}, 422, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": {"text": "x"}}, 422, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 422, "stream"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 17}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 257]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 500, "max_tokens": 13}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 512}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "y" * 600}]}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param, body
    return body["error"]


def still_serves(live: LiveServer) -> None:
    r = live.client().completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


@pytest.mark.parametrize("path, body, status, param", BAD,
                         ids=[f"{i}-{status}" for i, (_, _, status, _) in enumerate(BAD)])
def test_every_bad_request_gets_its_status_and_an_openai_error(live, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=live.url, timeout=60) as http:
        response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, status, param)
    still_serves(live)


def test_bodies_over_the_limit_get_413_by_header_and_by_size(live, engine):
    big = json.dumps({"model": MODEL, "prompt": "x" * 1_100_000}).encode()
    with httpx.Client(base_url=live.url, timeout=60) as http:
        assert_openai_error(http.post("/v1/completions", content=big), 413)

        def chunked() -> Iterator[bytes]:  # no Content-Length: only counting what arrives can tell
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        assert_openai_error(http.post("/v1/completions", content=chunked()), 413)
        assert_openai_error(http.get("/v1/nothing"), 404)
        assert_openai_error(http.get("/v1/completions"), 405)
        assert_openai_error(http.get("/v1/models/gpt-4"), 404, "model")
        assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    still_serves(live)
    assert idle(engine)


# -------------------------------------------------------------------------------------------- concurrency
def test_32_concurrent_streams_each_equal_the_request_served_alone(live, engine):
    prompts = [f"request {i}: " + "ab" * (i % 5) for i in range(32)]
    max_running = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            max_running[0] = max(max_running[0], engine.stats().num_running)
            time.sleep(0.001)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        text, finish, tokens = "", None, -1
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return text, finish, tokens

    async def run_all() -> tuple[list, list]:
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            together = await asyncio.gather(*(one(client, p) for p in prompts))
            alone = [await one(client, p) for p in prompts]
        return together, alone

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        together, alone = asyncio.run(run_all())
    finally:
        sampling.set()
        sampler.join()
    assert together == alone
    assert all(finish == "length" and tokens == 16 for _, finish, tokens in together)
    assert max_running[0] > 1  # they really were batched together
    wait_until(lambda: idle(engine), what="the engine to go idle")


def test_the_server_runs_on_the_http_stack_it_was_given(live):
    body = {"model": MODEL, "prompt": "stack", "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=live.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                         json=body) as response:
        lines = response.iter_lines()  # held: an abandoned iterator closes the response, and the connection with it
        next(line for line in lines if line.startswith("data: "))
        connections = list(live.server.server_state.connections)  # earlier tests' kept-alive ones too
        loop_modules = {type(c.loop).__module__.split(".")[0] for c in connections}
        protocols = {type(c).__name__ for c in connections}
    want_loop, want_http = live.http["loop"], live.http["http"]
    assert loop_modules == {want_loop}
    assert protocols == {{"h11": "H11Protocol", "httptools": "HttpToolsProtocol"}[want_http]}


# -------------------------------------------------------------------------------------------- disconnects
def test_a_client_leaving_mid_stream_aborts_its_request_and_frees_its_blocks(live, engine):
    before = engine.stats()
    body = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=live.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                         json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        assert engine.stats().blocks_used > 0
    # leaving the block with the body unread closes the connection
    wait_until(lambda: idle(engine), what="the aborted request's blocks to be freed")
    after = engine.stats()
    assert after.requests_finished_total == before.requests_finished_total  # aborted, not finished
    assert after.generation_tokens_total - before.generation_tokens_total < 480
    assert engine.engine.blocks.num_free == engine.engine.blocks.allocator.capacity
    still_serves(live)


def test_a_client_leaving_a_non_streaming_request_aborts_it(live, engine):
    before = engine.stats()
    body = json.dumps({"model": MODEL, "prompt": "Go on", "max_tokens": 500, "temperature": 0, "n": 4,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: engine.stats().num_running > 0, what="the request to start")
    wait_until(lambda: idle(engine), what="the aborted request's blocks to be freed")
    after = engine.stats()
    assert after.requests_finished_total == before.requests_finished_total
    assert after.generation_tokens_total - before.generation_tokens_total < 4 * 500
    still_serves(live)


# ------------------------------------------------------------------------------- API key, refusals, HF chat
@pytest.fixture(scope="module")
def guarded() -> Iterator[LiveServer]:
    """A second server with an API key, a small KV pool (7 blocks of 8 tokens) and an HF-style chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                 unk_token="[UNK]")
    hf.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
                        "{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    served = tiny_served_model(seed=0, name=MODEL)
    served.chat_renderer = lambda messages: render_hf(hf, messages)
    eng = AsyncLLMEngine.from_served(served, EngineConfig(**{**CONFIG, "num_blocks": 8}))
    eng.start()
    server = LiveServer(eng, api_key=API_KEY)
    server.hf_tokenizer = hf
    yield server
    server.close()
    eng.shutdown()


def test_api_key_is_required_on_v1_only(guarded):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY},
                        {"authorization": f"Basic {API_KEY}"}):
            assert_openai_error(http.post("/v1/completions", json=body, headers=headers), 401)
            assert_openai_error(http.get("/v1/models", headers=headers), 401)
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        ok = http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").models.list()
    assert guarded.client(api_key=API_KEY).models.list().data[0].id == MODEL


def test_engine_refusals_and_template_errors_are_400s(guarded):
    client = guarded.client(api_key=API_KEY)
    with httpx.Client(base_url=guarded.url, timeout=60, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        # fits the context (128) but not the pool (56 tokens): the engine's own ValueError
        error = assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 10,
                                                                      "max_tokens": 60}), 400)
        assert "KV blocks" in error["message"]
        error = assert_openai_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}), 400, "messages")
        assert "no system role" in error["message"]
    messages = [{"role": "user", "content": "hey"}]
    assert render_hf(guarded.hf_tokenizer, messages) == "[user]hey[assistant]"
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len("[user]hey[assistant]") and r.usage.completion_tokens == 3
    # without max_tokens a chat may use what the pool (56 tokens), not the context (128), leaves
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 56 - 20)
    assert idle(guarded.engine)


# ------------------------------------------------------------------------------------------ health, metrics
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition 0.0.4, strictly: HELP and TYPE before a metric's samples, one sample a line."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    helped: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"} and name not in types
            types[name] = kind
        else:
            m = SAMPLE.fullmatch(line)
            assert m, f"not a sample line: {line!r}"
            name = m.group(1)
            assert name in types and name in helped, f"{name} has no TYPE/HELP before it"
            samples[name] = float(m.group(3))
    for name, kind in types.items():
        assert kind != "counter" or name.endswith("_total"), name
    return samples


def test_metrics_parse_as_prometheus_text_and_health_works(live, engine):
    with httpx.Client(base_url=live.url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok"}
        still_serves(live)
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    m = parse_prometheus(response.text)
    p = "cs336_serving_"
    for name in ("num_requests_running", "num_requests_waiting", "kv_blocks_total", "kv_blocks_used",
                 "kv_blocks_free", "kv_blocks_high_water", "prompt_tokens_total", "generation_tokens_total",
                 "preemptions_total", "requests_finished_total", "generation_tokens_per_second", "kv_block_size"):
        assert p + name in m, name
    assert m[p + "kv_blocks_total"] == CONFIG["num_blocks"] - 1 == m[p + "kv_blocks_used"] + m[p + "kv_blocks_free"]
    assert m[p + "generation_tokens_total"] >= 1 and m[p + "prompt_tokens_total"] >= 2
    assert 0 < m[p + "kv_blocks_high_water"] <= m[p + "kv_blocks_total"]
    assert m[p + "kv_block_size"] == CONFIG["block_size"]
    assert 0 <= m[p + "event_loop_lag_seconds"] < 10  # the heartbeat started with the first request
    with httpx.Client(base_url=live.url, timeout=60) as http:
        stalls = http.get("/debug/loop_stalls", params={"since": time.monotonic() + 3600}).json()
    assert stalls == {"threshold_ms": 50.0, "samples": 0, "stacks": []}  # nothing after a future instant


def test_loop_lag_monitor_sees_a_blocked_loop_and_forgets_it_after_its_window():
    """A coroutine that holds the loop for 0.3 s (as a slow stream write would): the lag shows while the beat is
    overdue and after it ran late, and is forgotten once it leaves the window."""
    from cs336_systems.serving.api import LoopLagMonitor

    async def main():
        monitor = LoopLagMonitor(interval_s=0.01, window_s=1.0)
        assert monitor.max_recent() is None
        monitor.ensure_started()
        await asyncio.sleep(0.05)
        idle = monitor.max_recent()
        time.sleep(0.3)  # blocks the loop
        overdue = monitor.max_recent()
        await asyncio.sleep(0.05)
        late = monitor.max_recent()
        await asyncio.sleep(1.3)
        return idle, overdue, late, monitor.max_recent()

    idle, overdue, late, forgotten = asyncio.run(main())
    assert overdue >= 0.25 and 0.25 <= late < 1.0
    assert idle < 0.25 and forgotten < 0.25  # a loaded 2-core machine still beats within a quarter second


# (sample index, new text, finish reason) per engine step, and the writes expected: one string per write
ONE_SAMPLE = [[(0, "a", None)], [(0, "b", None)], [(0, "d", "length")]]
TWO_SAMPLES = [[(0, "a", None), (1, "a", None)], [(0, "b", None), (1, "c", "length")], [(0, "d", "length")]]


@pytest.mark.parametrize("steps, writes", [
    (ONE_SAMPLE, ["0:a:None", "0:b:None", "0:d:length|usage 3|[DONE]"]),
    (TWO_SAMPLES, ["0:a:None", "1:a:None", "0:b:None", "1:c:length", "0:d:length|usage 5|[DONE]"]),
])
def test_a_streams_last_chunk_usage_and_done_leave_in_one_write(steps, writes):
    """`_events` yields one string per write: every content chunk on its own (a sample that ends early too),
    except the stream's last chunk, which shares its write with the usage chunk and `[DONE]`."""
    from cs336_systems.serving.api import _events
    from cs336_systems.serving.params import CompletionOutput, RequestOutput

    n = len(steps[0])

    async def stream():
        texts = [""] * n
        for step in steps:
            outputs = []
            for index, delta, reason in step:
                texts[index] += delta
                outputs.append(CompletionOutput(index, texts[index], list(range(len(texts[index]))), delta,
                                                [len(texts[index]) - 1], reason))
            yield RequestOutput("r", [1], outputs, finished=step is steps[-1])

    async def collect():
        gen = stream()
        first = await gen.__anext__()
        return [line async for line in _events(
            [gen], [first], n, 1, True, False, [], lambda c, text, ids, finish: f"data: {c}:{text}:{finish}\n\n",
            lambda usage: f"data: usage {usage.completion_tokens}\n\n")]

    got = asyncio.run(collect())
    assert ["|".join(event.removeprefix("data: ") for event in w.split("\n\n") if event) for w in got] == writes


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call inside a coroutine, as a slow handler would make


def test_stall_sampler_names_the_function_that_held_the_loop_once_per_stall():
    """Two 0.3 s blocks of the loop by one function, called from two lines: two samples (one per late beat, not
    one per poll), two stacks, each with that function innermost; a `since` between them keeps the second."""
    from cs336_systems.serving.api import LoopLagMonitor

    async def main():
        monitor = LoopLagMonitor(interval_s=0.01)
        monitor.ensure_started()
        await asyncio.sleep(0.05)
        _hold_the_loop(0.3)
        await asyncio.sleep(0.05)
        between = time.monotonic()
        _hold_the_loop(0.3)
        await asyncio.sleep(0.05)
        return monitor.stalls.report(), monitor.stalls.report(since=between)

    everything, second = asyncio.run(main())
    assert everything["samples"] == 2 and second["samples"] == 1
    assert [g["count"] for g in everything["stacks"]] == [1, 1]
    for group in everything["stacks"]:
        assert group["stack"][-1].endswith("_hold_the_loop") and "main" in group["stack"][-2]
        assert 50 <= group["max_overdue_ms"] <= 400
    assert second["stacks"][0] in everything["stacks"]


# --------------------------------------------------------------------------------------------- chat.py alone
def test_plain_template_and_its_refusals():
    assert render_plain([{"role": "user", "content": "a"}], add_generation_prompt=False) == "<|user|>\na\n"
    with pytest.raises(ValueError, match="role"):
        render_plain([{"role": "wizard", "content": "a"}])
    with pytest.raises(ValueError, match="empty"):
        render_plain([])


# ---------------------------------------------------------------------------------- `cs336-systems serve`
def serve(argv: list[str]) -> int:
    """`cs336-systems serve ARGV` through the shared error boundary (the real `main` once serve is registered)."""
    from cs336_systems import cli

    if "serve" in cli.COMMANDS:
        return cli.main(["serve", *argv])
    parser = argparse.ArgumentParser(prog="cs336-systems serve")
    serve_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("cs336-systems", lambda: serve_cli.run(args))


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cs336-systems: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--run-dir", "{tmp}", "--port", "0"], "--port must be >= 1 and <= 65535, got 0"),
    (["--run-dir", "{tmp}", "--port", "70000"], "--port must be >= 1 and <= 65535, got 70000"),
    (["--run-dir", "{tmp}", "--block-size", "0"], "--block-size must be >= 1, got 0"),
    (["--run-dir", "{tmp}", "--num-blocks", "1"], "--num-blocks must be >= 2, got 1"),
    (["--run-dir", "{tmp}", "--max-num-seqs", "0"], "--max-num-seqs must be >= 1, got 0"),
    (["--run-dir", "{tmp}/missing"], "--run-dir {tmp}/missing: no such folder"),
    (["--hf-model", "{tmp}/missing"], "--hf-model {tmp}/missing: no such folder"),
    (["--run-dir", "{tmp}", "--tokenizer", "{tmp}/nope"], "--tokenizer {tmp}/nope: no such folder"),
    ([], "give exactly one model: --run-dir RUN or --hf-model DIR"),
    (["--run-dir", "{tmp}", "--hf-model", "{tmp}"], "give exactly one model"),
    (["--hf-model", "{tmp}", "--tokenizer", "{tmp}"], "--tokenizer goes with --run-dir"),
    (["--run-dir", "{tmp}", "--device", "tpu"], "--device must be cpu or cuda"),
    (["--run-dir", "{tmp}", "--device", "cpu", "--prefill-cpp-wrapper"], "--prefill-cpp-wrapper is for a compiled"),
    (["--run-dir", "{tmp}", "--prefill-cpp-wrapper", "--no-compile-prefill"], "prefill_cpp_wrapper (--prefill-cpp-"),
    (["--run-dir", "{tmp}", "--device", "cpu", "--prefill-cuda-graphs"], "--prefill-cuda-graphs needs a CUDA device"),
    (["--run-dir", "{tmp}", "--device", "cuda", "--prefill-cuda-graphs", "--no-cuda-graphs"],
     "--prefill-cuda-graphs and --no-cuda-graphs contradict"),
])
def test_serve_refuses_bad_settings_in_one_line_before_loading(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert serve(argv) == 2
    assert message.replace("{tmp}", str(tmp_path)) in one_line(capsys.readouterr().err)


def test_serve_refuses_a_port_in_use(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert serve(["--run-dir", str(tmp_path), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in one_line(capsys.readouterr().err)
