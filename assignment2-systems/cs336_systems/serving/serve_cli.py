"""`cs336-systems serve`: an OpenAI-compatible server for a `cs336-basics train` run or a Hugging Face folder.

    cs336-systems serve --run-dir runs/quickstart [--tokenizer runs/tokenizer] --port 8000
    cs336-systems serve --hf-model ./Qwen2.5-0.5B --api-key secret     # or CS336_API_KEY=secret
    cs336-systems serve --run-dir runs/quickstart --api-workers 4       # four HTTP processes, one engine

Every setting is checked before anything is loaded (a bad value or a missing folder is one line, exit 2), and
the listening socket is bound before the model loads, so a port in use fails at once rather than after it.
SIGINT or SIGTERM stops the HTTP workers (uvicorn's graceful shutdown), then the engine.
Importing this module imports neither torch nor the web stack: `cs336-systems --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

from cs336_basics.cli_support import UserError
from cs336_systems.serving.engine_args import (
    add_http_arguments,
    add_speed_arguments,
    check_speed_arguments,
    http_settings,
    speed_settings,
)

API_KEY_ENV = "CS336_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model (one of)")
    src.add_argument("--run-dir", metavar="RUN", help="a `cs336-basics train` run folder")
    src.add_argument("--tokenizer", metavar="DIR",
                     help="the run's tokenizer folder (default: tokenizer/ beside the run, quickstart's layout)")
    src.add_argument("--hf-model", metavar="DIR", help="a Hugging Face causal-LM folder (read offline)")
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    net.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    net.add_argument("--api-key", default=None,
                     help=f"require `Authorization: Bearer KEY` on /v1/* (default: ${API_KEY_ENV} if set; /health "
                          "and /metrics stay open)")
    net.add_argument("--served-model-name", default=None,
                     help="the `model` name clients use (default: the run or HF folder's name)")
    net.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (default 1 MB)")
    net.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_http_arguments(net)
    eng = parser.add_argument_group("engine")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    eng.add_argument("--num-blocks", type=int, default=None,
                     help="KV cache blocks (default: what free GPU memory holds on CUDA, enough for --max-num-seqs "
                          "full-length sequences on CPU)")
    eng.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch at most (default 256)")
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192,
                     help="prompt tokens in one prefill batch at most (default 8192)")
    add_speed_arguments(eng)
    eng.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    eng.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="weights and KV cache dtype (default: bfloat16 on CUDA, float32 on CPU)")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be refused without loading a model beyond the numeric ranges (cs336_systems.cli's
    RANGES, checked before this runs): the model source, folders, names."""
    if (args.run_dir is None) == (args.hf_model is None):
        raise UserError("give exactly one model: --run-dir RUN or --hf-model DIR")
    if args.tokenizer is not None and args.run_dir is None:
        raise UserError("--tokenizer goes with --run-dir (an HF folder carries its own tokenizer)")
    for flag, path in [("--run-dir", args.run_dir), ("--tokenizer", args.tokenizer), ("--hf-model", args.hf_model)]:
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: {'not a folder' if Path(path).exists() else 'no such folder'}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UserError("--served-model-name must not be empty")
    if args.device is not None and not args.device.startswith(("cpu", "cuda")):
        raise UserError(f"--device must be cpu or cuda[:N], got {args.device}")
    check_speed_arguments(args, args.device)


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound now: a port in use or an unknown host is a one-line error before loading.
    With `reuse_port`, the HTTP workers' own sockets can join it (api_workers.py)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while serving, so the workers and the engine are stopped on the way out
    (uvicorn shuts down gracefully on it, then raises it again; by default it would end the process at once)."""

    def exit_now(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    sock = bind(args.host, args.port, reuse_port=args.api_workers > 1)
    try:
        with sigterm_as_exit():
            serve(args, sock, api_key)
    finally:
        sock.close()
    return 0


def serve(args: argparse.Namespace, sock: socket.socket, api_key: str | None) -> None:
    """Loads the model, starts the engine and the extra HTTP workers, and serves as worker 0 until stopped."""
    import uvicorn

    from cs336_systems.serving.api import build_app
    from cs336_systems.serving.api_workers import start_workers, stop_workers
    from cs336_systems.serving.engine import EngineConfig
    from cs336_systems.serving.engine_process import ProcessEngine
    from cs336_systems.serving.loader import load_hf_model, load_run_model

    try:
        config = EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              device=args.device, dtype=args.dtype, **speed_settings(args))
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.hf_model is not None:
        loader = functools.partial(load_hf_model, args.hf_model, name=args.served_model_name)
    else:
        loader = functools.partial(load_run_model, args.run_dir, args.tokenizer, name=args.served_model_name)
    # Loaded here first, so a bad folder is a one-line error before the engine process starts.
    engine = ProcessEngine(loader, config, model_name=args.served_model_name, served=loader(),
                           extra_clients=args.api_workers - 1)
    engine.start()
    workers = []
    try:
        app_settings = {"api_key": api_key, "max_body_bytes": args.max_body_bytes}
        server_settings = {"log_level": args.log_level, "timeout_graceful_shutdown": 5, **http_settings(args)}
        workers = start_workers(engine, sock, app_settings, server_settings)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving `{engine.model_name}` (context {engine.context_length}) on http://{host}:{args.port}/v1"
              + (f" from {args.api_workers} HTTP processes" if workers else "")
              + (" (API key required)" if api_key else ""), flush=True)
        server = uvicorn.Server(uvicorn.Config(build_app(engine, **app_settings), **server_settings))
        server.run(sockets=[sock])
    finally:
        stop_workers(workers)
        engine.shutdown()
