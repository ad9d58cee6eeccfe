"""The engine's speed flags and the HTTP server's stack, defined once for `serve`, `bench-serve` and
`benchmarks/serving.py` (the speed flags' names are `EngineConfig`'s fields, so `speed_settings(args)` passes them
on as they are; `http_settings(args)` gives uvicorn's; `--api-workers` is read as `args.api_workers`)."""

from __future__ import annotations

import argparse
from typing import Any

MAX_API_WORKERS = 64  # cs336_systems.cli's RANGES holds --api-workers to 1..this
SPEED_FIELDS = ("prefill_delay_steps", "decode_steps", "async_scheduling", "overlap_prefill", "compile_decode",
                "compile_prefill", "prefill_cpp_wrapper", "prefill_cuda_graphs", "cuda_graphs")


def add_speed_arguments(group: Any) -> None:
    """The flags of `SPEED_FIELDS` on an argparse parser or argument group."""
    group.add_argument("--prefill-delay-steps", type=int, default=4,
                       help="decode steps a new prompt may wait so that close arrivals share a prefill (default 4)")
    group.add_argument("--decode-steps", type=int, default=4,
                       help="decode steps run on the GPU before the host reads, checks and streams the tokens "
                            "(default 4; 1 streams every token as it is made)")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                       help="launch the next decode window before the host processes the current one, so host "
                            "work overlaps the GPU's (a stopped sequence runs one discarded window; default on)")
    group.add_argument("--overlap-prefill", action=argparse.BooleanOptionalAction, default=None,
                       help="with asynchronous scheduling: queue a due prefill behind the decode window in flight, "
                            "so its host work overlaps the window's GPU time (same outputs; default: on with "
                            "asynchronous scheduling)")
    group.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=None,
                       help="the decode step as one torch.compile graph (compiled at start-up; fewer, fused kernels; "
                            "default: on with CUDA, off on CPU)")
    group.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=None,
                       help="the prefill pass as one torch.compile graph (compiled at start-up; fewer host calls; "
                            "default: on with CUDA, off on CPU)")
    group.add_argument("--prefill-cpp-wrapper", action="store_true",
                       help="with a compiled prefill: launch its kernels from inductor's generated C++ rather than "
                            "Python (fewer host microseconds per pass; longer start-up)")
    group.add_argument("--prefill-cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="pad prefill passes to a ladder of (rows, tokens) buckets and replay them from CUDA "
                            "graphs captured at start-up (a few host microseconds per pass, ~25 s more start-up; "
                            "default: on with CUDA and CUDA graphs, off on CPU)")
    group.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="decode eagerly instead of replaying captured CUDA graphs")


def check_speed_arguments(args: argparse.Namespace, device: str | None) -> None:
    """Refuses, before anything loads, a flag the engine would otherwise only refuse in its own process."""
    from cs336_basics.cli_support import UserError

    if args.prefill_cpp_wrapper and args.compile_prefill is None and not _cuda_device(device):
        raise UserError("--prefill-cpp-wrapper is for a compiled prefill, which is off on the CPU unless asked for "
                        "(--compile-prefill)")
    if args.prefill_cuda_graphs and not _cuda_device(device):
        raise UserError("--prefill-cuda-graphs needs a CUDA device")


def _cuda_device(device: str | None) -> bool:
    """Whether the engine will run on CUDA (its default device: CUDA when there is one)."""
    if device is not None:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def speed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`EngineConfig` keyword arguments from the parsed flags."""
    return {name: getattr(args, name) for name in SPEED_FIELDS}


def add_http_arguments(group: Any) -> None:
    """uvicorn's event loop and HTTP parser (its own `--loop` and `--http`, under names that say what they are),
    and how many HTTP processes serve the API."""
    group.add_argument("--http-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                       help="the HTTP server's event loop (default auto: uvloop when installed)")
    group.add_argument("--http-parser", choices=("auto", "h11", "httptools"), default="auto",
                       help="the HTTP server's protocol implementation (default auto: httptools when installed)")
    group.add_argument("--api-workers", type=int, default=1,
                       help="HTTP processes serving the API on the one port (SO_REUSEPORT: the kernel spreads "
                            "connections over them), each with its own event loop and connection to the one engine "
                            "process: streamed chunks past what one core can write (default 1; at most "
                            f"{MAX_API_WORKERS})")


def http_settings(args: argparse.Namespace) -> dict[str, str]:
    """`uvicorn.Config` keyword arguments from the parsed flags."""
    return {"loop": args.http_loop, "http": args.http_parser}
