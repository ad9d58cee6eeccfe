"""The engine in a process of its own, so the HTTP server and the step loop never wait on each other's
Python (one interpreter lock would otherwise serialize JSON/SSE work with scheduling and sampling).

The child loads the model, owns the `LLMEngine` and steps it; per step it sends each client (one connection per
HTTP process: `ProcessEngine`, the owner, and any `EngineClient` of an extra HTTP worker) one message with its
active requests' new tokens and text (deltas only, never the whole text again), plus a stats snapshot when one
is due. A client keeps a tokenizer for prompts and chat templates, rebuilds cumulative outputs from the deltas
on a reader thread and hands them to each request's asyncio consumer: the same interface as `AsyncLLMEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from cs336_systems.serving.engine import (
    EngineConfig,
    EngineDead,
    EngineStats,
    _deliver,
    check_request,
    queued_outputs,
)
from cs336_systems.serving.loader import ServedModel
from cs336_systems.serving.params import CompletionOutput, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

Loader = Callable[[], ServedModel]  # picklable (a module-level function or functools.partial of one)


STATS_INTERVAL_S = 0.05  # a running engine refreshes its clients' stats at most this often (and when one ends)
IDLE_WAIT_S = 0.5  # an idle engine waits this long for a message, then refreshes its clients' stats
OWNER = 0  # the client whose "stop", or whose end of the pipe closing, ends the engine


def _stats_tuple(engine) -> tuple:
    stats = engine.stats()
    return tuple(getattr(stats, f.name) for f in dataclasses.fields(stats))


def _child_main(loader: Loader, config: EngineConfig, conns: list[Connection]) -> None:
    """The engine process: load, report readiness to every client, then serve them until the owner stops."""
    try:
        from cs336_systems.serving.engine import LLMEngine

        engine = LLMEngine(loader(), config)
        stats = engine.stats()
        ready = ("ready", {"num_blocks": stats.blocks_total, "block_size": stats.block_size,
                           "vocab_size": engine.model.config.vocab_size,
                           "context_length": engine.context_length}, _stats_tuple(engine))
    except BaseException as error:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(("dead", f"{type(error).__name__}: {error}"))
        return
    hub = _Hub(engine, conns)
    hub.broadcast(ready)
    hub.serve()


class _Hub:
    """The engine's side of its clients' connections (one per HTTP process). Each client names its requests
    as it likes (two may use the same id), so the engine knows them as "client:id"; each step's outputs go
    back as one message per client that has some. A client whose pipe closes (its process died) has its
    requests aborted while the others are served on; the owner's closing, or its "stop", ends the engine."""

    def __init__(self, engine, conns: list[Connection]):
        self.engine = engine
        self.conns: dict[int, Connection] = dict(enumerate(conns))  # the open ones
        self.owners: dict[str, tuple[int, str]] = {}  # engine request id -> (client, the client's id)
        self.last_stats = time.monotonic()

    def serve(self) -> None:
        """Step while there is work, reading every client's messages between steps (without blocking while
        busy; waiting on all of them while idle)."""
        while True:
            try:
                ready = self._readable(busy=self.engine.has_unfinished())
                for client in ready:
                    self._drain(client)
                if OWNER not in self.conns:
                    return
                if not self.engine.has_unfinished():
                    if not ready:
                        self.broadcast(("stats", _stats_tuple(self.engine)))
                    continue
                self._step()
            except KeyboardInterrupt:
                return
            except BaseException as error:
                log.exception("engine step failed")
                self.broadcast(("dead", f"{type(error).__name__}: {error}"))
                return

    def _readable(self, busy: bool) -> list[int]:
        if busy:
            return [client for client, conn in self.conns.items() if conn.poll()]
        by_conn = {conn: client for client, conn in self.conns.items()}
        return [by_conn[conn] for conn in wait(list(by_conn), timeout=IDLE_WAIT_S)]

    def _drain(self, client: int) -> None:
        """Every message the client has sent so far."""
        conn = self.conns.get(client)
        try:
            while conn is not None and conn.poll():
                self._handle(client, conn.recv())
                conn = self.conns.get(client)
        except (EOFError, OSError):
            self._drop(client)

    def _handle(self, client: int, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, rid, prompt, params = message
            key = f"{client}:{rid}"
            try:
                self.engine.add_request(key, prompt, params)
            except ValueError as error:
                self.send(client, ("refused", rid, str(error)))
                return
            self.owners[key] = (client, rid)
        elif kind == "abort":
            key = f"{client}:{message[1]}"
            self.engine.abort(key)
            self.owners.pop(key, None)
        elif kind == "reset_high_water":
            self.engine.blocks.high_water = self.engine.blocks.num_used
            self.broadcast(("stats", _stats_tuple(self.engine)))
        elif kind == "stop":
            self._drop(client)

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.monotonic()
        stats = None
        if now - self.last_stats > STATS_INTERVAL_S or any(out.finished for out in outputs):
            stats, self.last_stats = _stats_tuple(self.engine), now
        by_client: dict[int, list[tuple]] = {}
        for out in outputs:
            owner = self.owners.pop(out.request_id, None) if out.finished else self.owners.get(out.request_id)
            if owner is None:  # aborted while its window was in flight
                continue
            client, rid = owner
            by_client.setdefault(client, []).append(
                (rid, out.finished, [(o.index, o.delta_text, o.delta_token_ids, o.finish_reason)
                                     for o in out.outputs]))
        for client in list(self.conns):
            compact = by_client.get(client)
            if compact is not None:
                self.send(client, ("step", compact, stats))
            elif stats is not None:
                self.send(client, ("stats", stats))

    def send(self, client: int, message: tuple) -> None:
        try:
            self.conns[client].send(message)
        except OSError:  # its process is gone
            self._drop(client)

    def broadcast(self, message: tuple) -> None:
        for client in list(self.conns):
            self.send(client, message)

    def _drop(self, client: int) -> None:
        """Forgets a client that left, aborting its requests (their blocks are free when this returns)."""
        conn = self.conns.pop(client, None)
        if conn is not None:
            conn.close()
        for key, (owner, _) in list(self.owners.items()):
            if owner == client:
                self.engine.abort(key)
                del self.owners[key]


class _Stream:
    """The parent's view of one request: where its outputs go and its cumulative text and ids so far."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, prompt: list[int], n: int):
        self.loop, self.queue, self.prompt = loop, queue, prompt
        self.texts = [""] * n
        self.ids: list[list[int]] = [[] for _ in range(n)]

    def update(self, rid: str, finished: bool, deltas: list[tuple]) -> RequestOutput:
        outputs = []
        for index, delta_text, delta_ids, reason in deltas:
            self.texts[index] += delta_text
            self.ids[index].extend(delta_ids)
            # The cumulative id list is shared, not copied per update (O(length) each time): readers must
            # not mutate it.
            outputs.append(CompletionOutput(index, self.texts[index], self.ids[index], delta_text, delta_ids,
                                            reason))
        return RequestOutput(rid, self.prompt, outputs, finished)


class EngineClient:
    """`AsyncLLMEngine`'s interface over one connection to the engine process: requests go down the pipe, a
    reader thread turns the engine's per-step deltas into each request's outputs. It owns no process: an HTTP
    worker's client (`api_workers`); the owner's is `ProcessEngine`.

    `served` needs the tokenizer, chat template, eos ids, name and config, not the weights
    (`ServedModel.without_weights`)."""

    def __init__(self, conn: Connection | None, served: ServedModel, model_name: str | None = None,
                 start_timeout_s: float = 600.0):
        self.served = served
        self.model_name = model_name or served.name
        self.context_length = served.context_length
        self.start_timeout_s = start_timeout_s
        self.error: BaseException | None = None
        self.info: dict[str, Any] = {}
        self._stats: EngineStats | None = None
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._conn = conn
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Takes the engine's readiness message (already sent when the engine started first) and starts reading."""
        if self._reader is None:
            self._connect(alive=lambda: True)

    def _connect(self, alive: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not self._conn.poll(0.2):
            if not alive() or time.monotonic() > deadline:
                raise EngineDead("the engine process did not start")
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            raise EngineDead("the engine process exited before it was ready") from None
        if message[0] != "ready":
            raise EngineDead(f"the engine process failed to start: {message[1]}")
        self.info = message[1]
        self._stats = EngineStats(*message[2])
        self._reader = threading.Thread(target=self._read, name="cs336-engine-reader", daemon=True)
        self._reader.start()

    def wait_gone(self) -> None:
        """Returns once the engine is gone (it stopped, died, or its pipe closed): an HTTP worker then exits."""
        if self._reader is not None:
            self._reader.join()

    # -- the interface ----------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        if self._stats is None:
            raise EngineDead("the engine has not started")
        return self._stats

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        check_request(prompt_token_ids, params, self.info["vocab_size"], self.context_length,
                      self.info["num_blocks"], self.info["block_size"])

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def reset_high_water(self) -> None:
        """Starts the KV blocks' high-water mark afresh (between benchmark phases, while idle)."""
        self._send(("reset_high_water",))
        time.sleep(0.05)  # the child answers with fresh stats

    def _send(self, message: tuple) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (OSError, AttributeError) as error:
            raise EngineDead(f"the engine process is gone: {error}") from None

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; closing the iterator early aborts the request."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error}")
        self.start()
        self.check_request(prompt_token_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = _Stream(asyncio.get_running_loop(), queue, list(prompt_token_ids), params.n)
        self._send(("add", request_id, list(prompt_token_ids), params))
        finished = False
        try:
            async for item in queued_outputs(queue):
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.error is None:
                with contextlib.suppress(EngineDead):
                    self.abort(request_id)

    # -- the reader thread ------------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = ("dead", "the engine process exited")
            kind = message[0]
            if kind == "step":
                if message[2] is not None:
                    self._stats = EngineStats(*message[2])
                by_loop: dict[asyncio.AbstractEventLoop, list] = {}
                for rid, finished, deltas in message[1]:
                    stream = self._streams.get(rid)
                    if stream is None:
                        continue
                    by_loop.setdefault(stream.loop, []).append((stream.queue, stream.update(rid, finished, deltas)))
                for loop, items in by_loop.items():
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(_deliver, items)
            elif kind == "stats":
                self._stats = EngineStats(*message[1])
            elif kind == "refused":
                stream = self._streams.get(message[1])
                if stream is not None:
                    with contextlib.suppress(RuntimeError):
                        stream.loop.call_soon_threadsafe(_deliver, [(stream.queue, ValueError(message[2]))])
            elif kind == "dead":
                self.error = EngineDead(f"the engine stopped: {message[1]}")
                for stream in list(self._streams.values()):
                    with contextlib.suppress(RuntimeError):
                        stream.loop.call_soon_threadsafe(_deliver, [(stream.queue, self.error)])
                return


class ProcessEngine(EngineClient):
    """The engine process's owner: starts and stops it, and is its first client (see the module docstring).
    With `extra_clients`, the process serves that many more connections (`client_connections`), one per
    extra HTTP process."""

    def __init__(self, loader: Loader, config: EngineConfig | None = None, model_name: str | None = None,
                 served: ServedModel | None = None, start_timeout_s: float = 600.0, extra_clients: int = 0):
        # The clients need the tokenizer and chat template, not the weights.
        super().__init__(None, (served if served is not None else loader()).without_weights(), model_name,
                         start_timeout_s)
        self.loader = loader
        self.config = config or EngineConfig()
        self.extra_clients = extra_clients
        self._process = None
        self._client_conns: list[Connection] = []

    def start(self) -> None:
        if self._process is not None:
            return
        context = mp.get_context("spawn")  # CUDA cannot be forked
        pipes = [context.Pipe() for _ in range(1 + self.extra_clients)]
        self._process = context.Process(target=_child_main, args=(self.loader, self.config,
                                                                  [child for _, child in pipes]),
                                        name="cs336-engine", daemon=True)
        self._process.start()
        for _, child in pipes:
            child.close()
        self._conn = pipes[0][0]
        self._client_conns = [parent for parent, _ in pipes[1:]]
        self._connect(alive=self._process.is_alive)

    def client_connections(self) -> list[Connection]:
        """The extra clients' ends of their pipes (after `start`): each goes to one HTTP worker process, and
        this process closes its copy once the worker has it, so that the worker's exit closes the pipe."""
        return list(self._client_conns)

    def shutdown(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(Exception), self._lock:
            self._conn.send(("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._process = None
        for conn in self._client_conns:
            conn.close()
        if self._reader is not None:
            self._reader.join(timeout=5)

    @property
    def pid(self) -> int | None:
        """The engine process's id (None before `start`), e.g. for its CPU time."""
        return None if self._process is None else self._process.pid
