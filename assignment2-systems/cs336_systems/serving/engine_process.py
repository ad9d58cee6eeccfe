"""The engine in a process of its own, so the HTTP server and the step loop never wait on each other's
Python (one interpreter lock would otherwise serialize JSON/SSE work with scheduling and sampling).

The child loads the model, owns the `LLMEngine` and steps it; per step it sends one message with each active
request's new tokens and text (deltas only, never the whole text again) plus a stats snapshot. The parent keeps
a tokenizer for prompts and chat templates, rebuilds cumulative outputs from the deltas on a reader thread and
hands them to each request's asyncio consumer: the same interface as `AsyncLLMEngine`.
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


STATS_INTERVAL_S = 0.05  # a running engine refreshes the parent's stats at most this often (and when one ends)


def _stats_tuple(engine) -> tuple:
    stats = engine.stats()
    return tuple(getattr(stats, f.name) for f in dataclasses.fields(stats))


def _child_main(loader: Loader, config: EngineConfig, conn) -> None:
    """The engine process: load, report readiness, then step while there is work and read commands between."""
    try:
        from cs336_systems.serving.engine import LLMEngine

        engine = LLMEngine(loader(), config)
        stats = engine.stats()
        conn.send(("ready", {"num_blocks": stats.blocks_total, "block_size": stats.block_size,
                             "vocab_size": engine.model.config.vocab_size,
                             "context_length": engine.context_length}, _stats_tuple(engine)))
    except BaseException as error:
        conn.send(("dead", f"{type(error).__name__}: {error}"))
        return
    last_stats = time.monotonic()
    while True:
        try:
            busy = engine.has_unfinished()
            while conn.poll(0 if busy else 0.5):
                message = conn.recv()
                kind = message[0]
                if kind == "stop":
                    return
                if kind == "abort":
                    engine.abort(message[1])
                elif kind == "reset_high_water":
                    engine.blocks.high_water = engine.blocks.num_used
                    conn.send(("stats", _stats_tuple(engine)))
                elif kind == "add":
                    _, rid, prompt, params = message
                    try:
                        engine.add_request(rid, prompt, params)
                    except ValueError as error:
                        conn.send(("refused", rid, str(error)))
                busy = engine.has_unfinished()
            if not busy:
                conn.send(("stats", _stats_tuple(engine)))
                last_stats = time.monotonic()
                continue
            outputs = engine.step()
            compact = [(out.request_id, out.finished,
                        [(o.index, o.delta_text, o.delta_token_ids, o.finish_reason) for o in out.outputs])
                       for out in outputs]
            now = time.monotonic()
            stats = None
            if now - last_stats > STATS_INTERVAL_S or any(out.finished for out in outputs):
                stats, last_stats = _stats_tuple(engine), now
            conn.send(("step", compact, stats))
        except (EOFError, BrokenPipeError, KeyboardInterrupt):
            return
        except BaseException as error:
            log.exception("engine step failed")
            with contextlib.suppress(Exception):
                conn.send(("dead", f"{type(error).__name__}: {error}"))
            return


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


class ProcessEngine:
    """`AsyncLLMEngine`'s interface over an engine process (see the module docstring)."""

    def __init__(self, loader: Loader, config: EngineConfig | None = None, model_name: str | None = None,
                 served: ServedModel | None = None, start_timeout_s: float = 600.0):
        self.loader = loader
        self.config = config or EngineConfig()
        # The parent needs the tokenizer and chat template, not the weights: they are dropped to the meta device.
        self.served = served if served is not None else loader()
        if self.served.model is not None:
            self.served.model = self.served.model.to("meta")
        self.model_name = model_name or self.served.name
        self.context_length = self.served.context_length
        self.start_timeout_s = start_timeout_s
        self.error: BaseException | None = None
        self.info: dict[str, Any] = {}
        self._stats: EngineStats | None = None
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._process = None
        self._conn = None
        self._reader: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._process is not None:
            return
        context = mp.get_context("spawn")  # CUDA cannot be forked
        parent_conn, child_conn = context.Pipe()
        self._process = context.Process(target=_child_main, args=(self.loader, self.config, child_conn),
                                        name="cs336-engine", daemon=True)
        self._process.start()
        child_conn.close()
        self._conn = parent_conn
        deadline = time.monotonic() + self.start_timeout_s
        while not parent_conn.poll(0.2):
            if not self._process.is_alive() or time.monotonic() > deadline:
                raise EngineDead("the engine process did not start")
        message = parent_conn.recv()
        if message[0] != "ready":
            raise EngineDead(f"the engine process failed to start: {message[1]}")
        self.info = message[1]
        self._stats = EngineStats(*message[2])
        self._reader = threading.Thread(target=self._read, name="cs336-engine-reader", daemon=True)
        self._reader.start()

    def shutdown(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(Exception), self._lock:
            self._conn.send(("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._process = None
        if self._reader is not None:
            self._reader.join(timeout=5)

    # -- the interface ----------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The engine process's id (None before `start`), e.g. for its CPU time."""
        return None if self._process is None else self._process.pid

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
