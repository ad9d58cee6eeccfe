"""The HTTP face of the engine: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, plus
`/health` and Prometheus `/metrics`. Nothing here knows how tokens are made; it turns requests into
`engine.generate` calls and the engine's `RequestOutput`s into OpenAI's JSON (or server-sent events).

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`:

- 400 a bad value (max_tokens < 1, temperature outside [0, 2], top_p outside (0, 1], n outside [1, 16], a prompt
  that with max_tokens does not fit the context or the KV pool, unknown token ids, unsupported options, a chat
  template that refuses the messages) or malformed JSON (an unparsable Content-Length never reaches the app:
  uvicorn answers it with its own plain-text 400);
- 401 a missing or wrong `Authorization: Bearer` key when the server has one (only `/v1/*` is guarded:
  `/health` and `/metrics` stay open for load balancers and scrapers);
- 404 an unknown model or path, 405 a wrong method;
- 413 a body over `max_body_bytes` (by its Content-Length or by what actually arrives);
- 422 a body that is JSON but not the schema (wrong types, missing fields);
- 500 a bug; an engine failure in the middle of a stream arrives as an `error` event, then `[DONE]`.

Completion responses (streamed or not), `/health` and `/metrics` name the HTTP process that served them in
`X-CS336-Worker-Pid` (with `--api-workers N`, N processes share the listening socket and the one engine: the
engine's gauges and counters are the same from each; the event loop's lag is the answering process's own).

Every request runs against the engine alone: a bad one is refused before the engine sees it (or the engine's
own `ValueError` is turned into a 400), so the server keeps serving. A client that goes away aborts its
requests: a stream's body generator is cancelled or closed (Starlette watches for the disconnect), which closes
the engine's generators, and the engine frees their KV blocks; a non-streaming request watches the connection
itself while it waits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cs336_systems.serving.engine import EngineDead
from cs336_systems.serving.loop_lag import LoopLagMonitor
from cs336_systems.serving.params import RequestOutput, SamplingParams
from cs336_systems.serving.protocol import (
    AssistantMessage,
    BadRequest,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)

log = logging.getLogger("cs336_systems.serving")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# /metrics: (EngineStats field, metric name, type, help)
METRICS: list[tuple[str, str, str, str]] = [
    ("num_running", "num_requests_running", "gauge", "Sequences in the running batch."),
    ("num_waiting", "num_requests_waiting", "gauge", "Sequences waiting to be scheduled."),
    ("blocks_total", "kv_blocks_total", "gauge", "KV cache blocks that sequences can hold."),
    ("blocks_used", "kv_blocks_used", "gauge", "KV cache blocks held by sequences now."),
    ("blocks_free", "kv_blocks_free", "gauge", "KV cache blocks on the free list."),
    ("blocks_high_water", "kv_blocks_high_water", "gauge", "Most KV cache blocks held at once since start."),
    ("prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens prefilled (recomputes included)."),
    ("generation_tokens_total", "generation_tokens_total", "counter", "Tokens generated."),
    ("preemptions_total", "preemptions_total", "counter", "Sequences preempted (to be recomputed)."),
    ("requests_finished_total", "requests_finished_total", "counter",
     "Requests that ran to their end (aborted ones excluded)."),
    ("tokens_per_s", "generation_tokens_per_second", "gauge", "Generated tokens per second, recent window."),
]
METRIC_PREFIX = "cs336_serving_"


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


class ClientGone(Exception):
    """The client closed the connection while its request was being served."""


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | int | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"

ChunkMaker = Callable[[int, str, "list[int] | None", "str | None"], str]
_INDEX_MARK = -7_364_921_058  # values no chunk carries, to find where a rendered chunk holds them
_TEXT_MARK = "cs336-text-mark-9f4e2b"
_ID_MARK = 8_462_019_377


def _split_at_markers(sample: str, ids: bool) -> list[str] | None:
    """A rendering of the marker values cut around them (index, text and, with `ids`, the one-id list), in that
    order; None unless each marker is there exactly once."""
    markers = [str(_INDEX_MARK), to_json(_TEXT_MARK).decode()] + ([f"[{_ID_MARK}]"] if ids else [])
    pieces, rest = [], sample
    for marker in markers:
        if sample.count(marker) != 1 or marker not in rest:
            return None
        head, rest = rest.split(marker)
        pieces.append(head)
    return [*pieces, rest]


def templated(render: ChunkMaker) -> ChunkMaker:
    """`render` (choice index, text, token ids, finish_reason → SSE line, through pydantic), with its most common
    calls, a text fragment of a running choice (no finish_reason) with or without its token ids, assembled from
    one rendering of each with marker values split around them: the HTTP process builds one such line per
    streamed chunk, and pydantic's validation and serialisation of it cost 5 µs on the developer CPU (this,
    0.4 µs). The text goes through pydantic-core's own JSON string encoder and the ids are written as its
    compact list, so the bytes are `render`'s (a test compares them); any other call, or a rendering whose
    markers can't be found exactly once, goes to `render`."""
    plain = _split_at_markers(render(_INDEX_MARK, _TEXT_MARK, None, None), ids=False)
    with_ids = _split_at_markers(render(_INDEX_MARK, _TEXT_MARK, [_ID_MARK], None), ids=True)
    if plain is None and with_ids is None:
        return render

    def chunk(choice: int, text: str, token_ids: list[int] | None, finish: str | None) -> str:
        if finish is None and text:
            if token_ids is None and plain is not None:
                head, middle, tail = plain
                return f"{head}{choice:d}{middle}{to_json(text).decode()}{tail}"
            if token_ids is not None and with_ids is not None:
                head, middle, between, tail = with_ids
                listed = ",".join(map(str, token_ids))
                return f"{head}{choice:d}{middle}{to_json(text).decode()}{between}[{listed}]{tail}"
        return render(choice, text, token_ids, finish)

    return chunk


class EventStream(StreamingResponse):
    """Server-sent events whose body generator is always closed when the response ends, however it ends (a
    disconnect cancels it under ASGI < 2.4; under 2.4 a failed send leaves it suspended, and only this `aclose`
    reaches the engine's generator inside)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ engine streams
async def _prime(gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The first output of every stream, concurrently. The engine refuses a request (ValueError) before its
    first output, so this is where a refusal becomes an HTTP error rather than a broken stream; on any failure
    every stream is closed (aborting the requests that did start)."""

    async def first(g: AsyncIterator[RequestOutput]) -> RequestOutput:
        return await g.__anext__()

    tasks = [asyncio.ensure_future(first(g)) for g in gens]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()  # type: ignore[attr-defined]
        raise


async def _merged(gens: list[AsyncIterator[RequestOutput]],
                  firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every stream as they come. Closing this closes the streams."""
    if len(gens) == 1:
        async with aclosing(gens[0]) as g:  # type: ignore[type-var]
            yield 0, firsts[0]
            async for out in g:
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, g: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(g):  # type: ignore[type-var]
                await queue.put((i, firsts[i]))
                async for out in g:
                    await queue.put((i, out))
            await queue.put((i, None))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(gens: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput]) -> list[RequestOutput]:
    """The final output of every stream."""
    finals = list(firsts)
    async with aclosing(_merged(gens, firsts)) as merged:
        async for i, out in merged:
            finals[i] = out
    return finals


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled (aborting its engine requests) if the client disconnects first -> ClientGone. The
    request body has been read by now, so the next ASGI message can only be the disconnect."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not job.done():  # the client left (or this handler was cancelled): abort the work
            job.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)
    if job.cancelled():
        raise ClientGone()
    return job.result()


# ------------------------------------------------------------------------------------------------- the app
class _Server:
    def __init__(self, engine: Any, api_key: str | None, max_body_bytes: int, model_name: str | None):
        self.engine = engine
        self.loop_lag = LoopLagMonitor()
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.model_name = model_name or engine.model_name
        self.created = int(time.time())
        self.headers = {"X-CS336-Worker-Pid": str(os.getpid())}  # which HTTP process served
        self.context_length = int(engine.context_length)
        self.vocab_size = _vocab_size(engine)

    # -- request plumbing ----------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise APIError(400, f"invalid Content-Length {declared!r}") from None
            if size > self.max_body_bytes:
                raise self.too_large(size)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self.too_large(size)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None

    def too_large(self, size: int) -> APIError:
        return APIError(413, f"request body is larger than {self.max_body_bytes} bytes ({size}+)",
                        code="request_too_large")

    def parse(self, model: type[M], body: Any) -> M:
        try:
            req = model.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "body"
            raise APIError(422, f"{where}: {first['msg']} ({e.error_count()} error(s))",
                           param=str(first["loc"][0]) if first["loc"] else None, code=first["type"]) from None
        name = req.model  # type: ignore[attr-defined]
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")
        return req

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.engine.served.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
            if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in ids):
                raise BadRequest(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        if not ids:
            raise BadRequest("prompt must not be empty", "prompt")
        return ids

    def check_fits(self, prompts: list[list[int]], max_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if longest >= self.context_length:
            raise BadRequest(f"This model's maximum context length is {self.context_length} tokens; the prompt has "
                             f"{longest}, leaving no room for a completion.", "prompt")
        if longest + max_tokens > self.context_length:
            raise BadRequest(f"This model's maximum context length is {self.context_length} tokens; you requested "
                             f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} for the completion). "
                             "Reduce the prompt or max_tokens.", "max_tokens")

    def room(self) -> int:
        """Tokens one sequence may hold: the context, or fewer when the KV pool is smaller than one context."""
        stats = self.engine.stats()
        pool = getattr(stats, "blocks_total", None), getattr(stats, "block_size", None)
        return min(self.context_length, pool[0] * pool[1]) if None not in pool else self.context_length

    async def start(self, request: Request, request_id: str, prompts: list[list[int]],
                    params: SamplingParams) -> tuple[list[AsyncIterator[RequestOutput]], list[RequestOutput]]:
        """The engine streams of a request's prompts and their first outputs (ValueError -> 400)."""
        self.loop_lag.ensure_started()
        gens = [self.engine.generate(f"{request_id}-{i}", ids, params) for i, ids in enumerate(prompts)]
        try:
            firsts = await _unless_disconnected(request, _prime(gens))
        except ValueError as e:
            raise BadRequest(str(e)) from e
        return gens, firsts

    # -- metrics -------------------------------------------------------------------------------------------
    def metrics_text(self) -> str:
        self.loop_lag.ensure_started()
        stats = self.engine.stats()
        lines = []
        lag = self.loop_lag.max_recent()
        if lag is not None:
            full = METRIC_PREFIX + "event_loop_lag_seconds"
            lines += [f"# HELP {full} Largest delay of a 10 ms heartbeat on the event loop of the HTTP process that "
                      "answers over the last 10 s: how long a ready stream write may wait.", f"# TYPE {full} gauge",
                      f"{full} {_number(float(lag))}"]
        for field, name, kind, help_text in METRICS:
            value = getattr(stats, field, None)
            if value is None:
                continue
            full = METRIC_PREFIX + name
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {_number(value)}"]
        for name, value, help_text in [("context_length", self.context_length, "Tokens a sequence may hold."),
                                       ("kv_block_size", getattr(stats, "block_size", None),
                                        "Tokens per KV cache block."),
                                       ("kv_block_bytes", getattr(stats, "kv_bytes_per_block", None),
                                        "Bytes of K and V one block holds over all layers.")]:
            if value is not None:
                full = METRIC_PREFIX + name
                lines += [f"# HELP {full} {help_text}", f"# TYPE {full} gauge", f"{full} {_number(value)}"]
        return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def _vocab_size(engine: Any) -> int | None:
    served = getattr(engine, "served", None)
    for owner, attr in [(served, "vocab_size"), (getattr(getattr(served, "model", None), "config", None),
                                                 "vocab_size")]:
        value = getattr(owner, attr, None)
        if isinstance(value, int):
            return value
    return None


def build_app(engine: Any, *, api_key: str | None = None, max_body_bytes: int = 1_000_000,
              model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (an `AsyncLLMEngine`, already started) as `model_name` (default: the
    engine's). With `api_key`, every `/v1/*` request needs `Authorization: Bearer <api_key>`."""
    server = _Server(engine, api_key, max_body_bytes, model_name)
    app = FastAPI(title="cs336 inference server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(BadRequest)
    async def on_bad_request(request: Request, e: BadRequest) -> JSONResponse:
        return error_response(400, str(e), param=e.param)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # gone while sending its body
    async def on_client_gone(request: Request, e: Exception) -> JSONResponse:
        return error_response(499, "client closed the connection", code="client_closed_request")

    @app.exception_handler(EngineDead)
    async def on_engine_dead(request: Request, e: EngineDead) -> JSONResponse:
        return error_response(503, str(e), type="server_error", code="engine_dead")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s", request.url.path)
        return error_response(500, f"internal server error ({type(e).__name__})", type="server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        error = getattr(engine, "error", None)
        if error is not None:
            return error_response(503, f"the engine stopped: {error}", type="server_error", code="engine_dead")
        return JSONResponse({"status": "ok"}, headers=server.headers)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8",
                                 headers=server.headers)

    @app.get("/debug/loop_stalls")
    async def loop_stalls(request: Request, since: float | None = None) -> JSONResponse:
        """Where the event loop was when its heartbeat ran ≥ 50 ms late: stacks by frequency; `since`: only
        samples after that time.monotonic() (this process's clock: the benchmark's in-process server)."""
        server.authorize(request)
        server.loop_lag.ensure_started()
        return JSONResponse(server.loop_lag.stalls.report(since))

    def card() -> ModelCard:
        return ModelCard(id=server.model_name, created=server.created, max_model_len=server.context_length)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.authorize(request)
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> JSONResponse:
        server.authorize(request)
        if model != server.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(card().model_dump())

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | EventStream:
        server.authorize(request)
        req = server.parse(CompletionRequest, await server.read_json(request))
        params = req.sampling_params(16 if req.max_tokens is None else req.max_tokens, vocab_size=server.vocab_size)
        prompts = [server.encode(p) for p in req.prompts()]
        server.check_fits(prompts, params.max_tokens)
        request_id = new_id("cmpl")
        gens, firsts = await server.start(request, request_id, prompts, params)
        prompt_tokens = sum(len(p) for p in prompts)
        n = params.n

        created = int(time.time())  # one timestamp for every chunk of a stream, as OpenAI's

        def chunk(choice: int, text: str, ids: list[int] | None, finish: str | None) -> str:
            c = CompletionChoice(index=choice, text=text, finish_reason=finish, token_ids=ids)
            return sse(Completion(id=request_id, created=created, model=server.model_name, choices=[c]))

        if req.stream:
            def usage_chunk(usage: Usage) -> str:
                return sse(Completion(id=request_id, created=created, model=server.model_name, choices=[],
                                      usage=usage))

            return EventStream(_events(gens, firsts, n, prompt_tokens, req.include_usage, req.return_token_ids,
                                       [], templated(chunk), usage_chunk), server.headers)
        finals = await _unless_disconnected(request, _collect(gens, firsts))
        choices = sorted((CompletionChoice(index=i * n + o.index, text=o.text, finish_reason=o.finish_reason,
                                           token_ids=list(o.token_ids) if req.return_token_ids else None)
                          for i, out in enumerate(finals) for o in out.outputs), key=lambda c: c.index)
        usage = Usage.of(prompt_tokens, sum(len(o.token_ids) for out in finals for o in out.outputs))
        return JSONResponse(Completion(id=request_id, model=server.model_name, choices=choices,
                                       usage=usage).model_dump(), headers=server.headers)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | EventStream:
        server.authorize(request)
        req = server.parse(ChatCompletionRequest, await server.read_json(request))
        messages = req.message_dicts()
        try:
            prompt_text = engine.served.apply_chat_template(messages)
        except ValueError as e:
            raise BadRequest(str(e), "messages") from e
        ids = server.encode(prompt_text)
        requested = req.requested_max_tokens()
        if requested is None:  # as many tokens as the context (and the KV pool) leave; none: the prompt is too long
            server.check_fits([ids], 1)
        max_tokens = requested if requested is not None else max(1, server.room() - len(ids))
        try:
            params = req.sampling_params(max_tokens, vocab_size=server.vocab_size)
            server.check_fits([ids], params.max_tokens)
        except BadRequest as e:  # name the field the client actually sent
            if e.param == "max_tokens" and req.max_completion_tokens is not None:
                e.param = "max_completion_tokens"
            raise
        request_id = new_id("chatcmpl")
        gens, firsts = await server.start(request, request_id, [ids], params)
        n = params.n

        created = int(time.time())  # one timestamp for every chunk of a stream, as OpenAI's

        def chunk(choice: int, text: str, token_ids: list[int] | None, finish: str | None) -> str:
            c = ChatChunkChoice(index=choice, delta=Delta(content=text) if text else Delta(),
                                finish_reason=finish, token_ids=token_ids)
            return sse(ChatCompletionChunk(id=request_id, created=created, model=server.model_name, choices=[c]))

        if req.stream:
            opening = [sse(ChatCompletionChunk(id=request_id, created=created, model=server.model_name, choices=[
                ChatChunkChoice(index=c, delta=Delta(role="assistant", content=""))])) for c in range(n)]

            def usage_chunk(usage: Usage) -> str:
                return sse(ChatCompletionChunk(id=request_id, created=created, model=server.model_name, choices=[],
                                               usage=usage))

            return EventStream(_events(gens, firsts, n, len(ids), req.include_usage, req.return_token_ids,
                                       opening, templated(chunk), usage_chunk), server.headers)
        (final,) = await _unless_disconnected(request, _collect(gens, firsts))
        choices = sorted((ChatChoice(index=o.index, message=AssistantMessage(content=o.text),
                                     finish_reason=o.finish_reason,
                                     token_ids=list(o.token_ids) if req.return_token_ids else None)
                          for o in final.outputs), key=lambda c: c.index)
        usage = Usage.of(len(ids), sum(len(o.token_ids) for o in final.outputs))
        return JSONResponse(ChatCompletion(id=request_id, model=server.model_name, choices=choices,
                                           usage=usage).model_dump(), headers=server.headers)

    return app


async def _events(gens: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput], n: int, prompt_tokens: int,
                  include_usage: bool, with_ids: bool, opening: list[str],
                  chunk: Callable[[int, str, list[int] | None, str | None], str],
                  usage_chunk: Callable[[Usage], str]) -> AsyncIterator[str]:
    """The SSE body shared by both endpoints: `opening` chunks, one chunk per new text (and finish_reason) of
    each choice, the usage chunk when asked for, then `[DONE]`. Choice index = prompt index * n + sample index.
    The last choice's final chunk, the usage chunk and `[DONE]` go out as one write: each write is a system call
    (most of the server's CPU per chunk), and nothing else can come between them."""
    completion_tokens: dict[int, int] = {}
    finished: set[int] = set()
    held = ""
    for line in opening:
        yield line
    try:
        async with aclosing(_merged(gens, firsts)) as merged:
            async for i, out in merged:
                for o in out.outputs:
                    c = i * n + o.index
                    if c in finished:
                        continue
                    completion_tokens[c] = len(o.token_ids)
                    new_ids = list(o.delta_token_ids)
                    if o.delta_text or o.finish_reason or (with_ids and new_ids):
                        line = chunk(c, o.delta_text, new_ids if with_ids else None, o.finish_reason)
                        if o.finish_reason and len(finished) + 1 == len(gens) * n:
                            held = line  # the stream's last chunk
                        else:
                            yield line
                    if o.finish_reason:
                        finished.add(c)
    except Exception as e:  # the engine failed mid-stream: tell the client in-band, the status is already 200
        log.exception("stream failed")
        yield sse(ErrorResponse(error=ErrorInfo(message=f"generation failed ({type(e).__name__}: {e})",
                                                type="server_error")))
        yield SSE_DONE
        return
    if include_usage:
        held += usage_chunk(Usage.of(prompt_tokens, sum(completion_tokens.values())))
    yield held + SSE_DONE
