"""`--api-workers N`: N HTTP processes on one port in front of one engine process.

One HTTP process writes every streamed chunk of every client (one system call each, plus uvicorn's and
Starlette's Python around it), which tops out at one core; the engine can make tokens faster than that. The
process that owns the engine (`ProcessEngine`, which serves as HTTP worker 0) starts N−1 more, each a spawned
process running uvicorn with `build_app` over its own `EngineClient`. The workers get the served model without
its weights.

Each worker listens on a socket of its own bound to the owner's address with SO_REUSEPORT (Linux), so the
kernel spreads new connections over the processes by a hash of their addresses. One socket shared by all goes
to whichever process calls accept first, which under load is the one already running: on the developer's two
cores, with two busy loops beside, three processes took five rounds of 32 concurrent streams as 32/0/0,
30/1/1, 26/6/0, 25/6/1 and 20/12/0 over a shared socket, and 13/11/8, 14/12/6, 14/10/8, 15/10/7 and 12/10/10
with SO_REUSEPORT. The owner's socket must be bound with the option too (`serve_cli.bind(..., reuse_port=True)`);
another server of the same user that binds the port with it would then join rather than be refused (a port
held any other way still is). A connection waiting in a worker's queue when that worker dies is reset; new
ones go to the others.

A worker exits when its engine connection closes (the engine stopped or died, or its owner was killed), so
none outlives the server; one that dies takes only its own requests with it (the engine aborts them).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from cs336_systems.serving.engine_process import EngineClient, ProcessEngine
from cs336_systems.serving.loader import ServedModel

START_TIMEOUT_S = 120.0  # a worker imports the web stack and torch before it serves


def start_workers(engine: ProcessEngine, sock: socket.socket, app_settings: dict[str, Any],
                  server_settings: dict[str, Any]) -> list[BaseProcess]:
    """One worker process per extra client connection of the started `engine`, each serving
    `build_app(client, **app_settings)` with `uvicorn.Config(app, **server_settings)` on a socket of its own
    beside `sock` (bound with SO_REUSEPORT); returns once every one of them accepts connections."""
    context = mp.get_context("spawn")
    workers: list[BaseProcess] = []
    started: list[Connection] = []
    try:
        for i, conn in enumerate(engine.client_connections(), start=1):
            told, tell = context.Pipe(duplex=False)
            worker = context.Process(target=_worker_main, name=f"cs336-http-{i}", daemon=True, args=(
                (sock.family, sock.getsockname()), conn, engine.served, engine.model_name, app_settings,
                server_settings, tell))
            worker.start()
            for end in (conn, tell):  # the worker has its own copies: its exit is what closes them
                end.close()
            workers.append(worker)
            started.append(told)
        deadline = time.monotonic() + START_TIMEOUT_S
        for worker, told in zip(workers, started, strict=True):
            while not told.poll(0.1):
                if not worker.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"HTTP worker {worker.name} did not start (exit code {worker.exitcode})")
    except BaseException:
        stop_workers(workers)
        raise
    finally:
        for told in started:
            told.close()
    return workers


def stop_workers(workers: list[BaseProcess], timeout_s: float = 10.0) -> None:
    """SIGTERM (uvicorn's graceful shutdown: open streams get its few seconds), then SIGKILL for any worker
    still there after `timeout_s`."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()


def _worker_main(address: tuple[int, Any], conn: Connection, served: ServedModel, model_name: str,
                 app_settings: dict[str, Any], server_settings: dict[str, Any], tell: Connection) -> None:
    """A spawned HTTP worker: its engine client, the app, uvicorn on its own socket at the owner's (family,
    address) until SIGTERM/SIGINT or until the engine is gone."""
    from cs336_systems.serving.api import build_app

    client = EngineClient(conn, served, model_name)
    client.start()
    server = _TellingServer(uvicorn.Config(build_app(client, **app_settings), **server_settings), tell)
    threading.Thread(target=_exit_with_engine, args=(client, server), name="cs336-engine-watch", daemon=True).start()
    server.run(sockets=[_listener(*address)])


def _listener(family: int, address: Any) -> socket.socket:
    """A listening socket of this worker's own at `address`, in the owner's SO_REUSEPORT group."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(2048)
    return sock


class _TellingServer(uvicorn.Server):
    """uvicorn's server, telling the process that started it once it accepts connections."""

    def __init__(self, config: uvicorn.Config, tell: Connection):
        super().__init__(config)
        self.tell = tell

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.tell.send(os.getpid())


def _exit_with_engine(client: EngineClient, server: Any) -> None:
    client.wait_gone()
    server.should_exit = True
