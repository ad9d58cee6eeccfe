"""`cs336-systems bench-serve`: our server (continuous batching, paged KV) against static batching, same workload.

The server is either one already running (`--url`, loopback only) or, by default, started here in-process on a
free loopback port from `--hf-model`, `--run-dir` or `--preset` (random weights), with `--api-workers` HTTP
processes (this one and N−1 spawned). A run dir or preset is first
written as a Hugging Face folder, so the server, HF `generate` and our non-paged decoding load the same weights.
For each concurrency the load generator replays its requests against the server, then the baselines decode
the same requests offline in static batches. Writes JSON, a Markdown table and a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from cs336_basics.cli_support import UserError, atomic_write
from cs336_systems.serving.engine_args import (
    add_http_arguments,
    add_speed_arguments,
    check_speed_arguments,
    http_settings,
    speed_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
FIG_DIR = REPO_ROOT / "fig"
RESULTS_DIR = REPO_ROOT / "assignment2-systems" / "benchmarks" / "results"
BASELINES = ("engine", "hf", "nonpaged")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to serve (one of them unless --url only measures a running server)")
    src.add_argument("--url", default=None, help="a running OpenAI-compatible server on loopback, e.g. "
                     "http://127.0.0.1:8000 (default: start ours in-process)")
    src.add_argument("--hf-model", default=None, metavar="DIR", help="a Hugging Face folder (Llama/Mistral/DeepseekV3)")
    src.add_argument("--run-dir", default=None, metavar="DIR", help="a `cs336-basics train` run folder")
    src.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="the run's tokenizer folder (default: tokenizer/ beside the run)")
    src.add_argument("--preset", default=None, help="a cs336-basics preset with random weights, e.g. tinystories-17m")
    src.add_argument("--context-length", type=int, default=None,
                     help="--preset only: override its context length (random weights: only the longest sequence "
                     "changes)")
    load = p.add_argument_group("workload")
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    load.add_argument("--num-requests", type=int, nargs="+", default=None,
                      help="requests per concurrency: one value for all, or one per --concurrency value "
                      "(default: max(8, 2 x concurrency), so every level runs at least two rounds)")
    load.add_argument("--prompt-len-range", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    load.add_argument("--output-len-range", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--baselines", default="engine,hf,nonpaged",
                      help="comma-separated from engine (ours without HTTP), hf, nonpaged; 'none' for the server "
                           "only")
    load.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout, seconds")
    load.add_argument("--time-budget", type=float, default=3600.0,
                      help="seconds after which remaining measurements are recorded as skipped")
    eng = p.add_argument_group("the in-process server's engine")
    eng.add_argument("--block-size", type=int, default=16)
    eng.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: the engine's choice)")
    eng.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest --concurrency")
    add_speed_arguments(eng)
    add_http_arguments(p.add_argument_group("the in-process server's HTTP stack"))
    out = p.add_argument_group("outputs")
    out.add_argument("--out-json", type=Path, default=RESULTS_DIR / "serving.json")
    out.add_argument("--out-md", type=Path, default=FIG_DIR / "serving.md")
    out.add_argument("--fig", type=Path, default=FIG_DIR / "serving.png")


# ----------------------------------------------------------------------------------------------- settings
def parse_baselines(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise UserError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)} or none")
    return list(dict.fromkeys(names))


def requests_per_level(concurrency: list[int], num_requests: list[int] | None) -> list[int]:
    if num_requests is None:
        return [max(8, 2 * c) for c in concurrency]
    if len(num_requests) == 1:
        return num_requests * len(concurrency)
    if len(num_requests) != len(concurrency):
        raise UserError(f"--num-requests takes one value or one per --concurrency value ({len(concurrency)}), "
                        f"got {len(num_requests)}")
    return list(num_requests)


def check_settings(args: argparse.Namespace) -> None:
    """What argparse and the shared ranges cannot see, before anything loads."""
    for flag, values in [("--concurrency", args.concurrency), ("--num-requests", args.num_requests or [1]),
                         ("--prompt-len-range", args.prompt_len_range),
                         ("--output-len-range", args.output_len_range)]:
        if any(v < 1 for v in values):
            raise UserError(f"{flag} values must be >= 1, got {values}")
    for flag, (lo, hi) in [("--prompt-len-range", args.prompt_len_range),
                           ("--output-len-range", args.output_len_range)]:
        if lo > hi:
            raise UserError(f"{flag} MIN must not exceed MAX, got {lo} {hi}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.url is None:  # the in-process server's engine
        check_speed_arguments(args, None)
    elif args.api_workers != 1:
        raise UserError("--api-workers is for the in-process server, not a running one (--url)")
    if not args.timeout_s > 0 or not args.time_budget > 0:
        raise UserError("--timeout-s and --time-budget must be > 0")
    sources = [f for f, v in [("--hf-model", args.hf_model), ("--run-dir", args.run_dir), ("--preset", args.preset)]
               if v is not None]
    if len(sources) > 1:
        raise UserError(f"give one of --hf-model, --run-dir, --preset, not {' and '.join(sources)}")
    if not sources and args.url is None:
        raise UserError("nothing to serve: give --hf-model, --run-dir or --preset (or --url of a running server)")
    if args.context_length is not None and args.preset is None:
        raise UserError("--context-length applies to --preset only")
    if args.url is not None:
        from cs336_systems.serving.loadgen import LoopbackOnlyError, check_loopback_url

        try:
            check_loopback_url(args.url)
        except LoopbackOnlyError as e:
            raise UserError(str(e)) from None
    for flag, path in [("--hf-model", args.hf_model), ("--run-dir", args.run_dir), ("--tokenizer", args.tokenizer)]:
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: no such folder")
    if args.preset is not None:
        from cs336_basics.training.config import PRESETS

        if args.preset not in PRESETS:
            raise UserError(f"--preset {args.preset!r}: choose from {', '.join(sorted(PRESETS))}")
    parse_baselines(args.baselines)
    requests_per_level(args.concurrency, args.num_requests)


# -------------------------------------------------------------------------------------------------- server
def process_cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds of a process, all its threads (this one when `pid` is None); None where Linux's
    /proc is not there to read another's."""
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def _loop_stalls(server_url: str, since: float) -> dict[str, Any] | None:
    """Our in-process server's loop-stall samples since `since` (time.monotonic(), one clock for every process
    here), from whichever HTTP process answers."""
    import httpx

    try:
        response = httpx.get(f"{server_url}/debug/loop_stalls", params={"since": since}, timeout=30,
                             trust_env=False)
        return response.json() if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


class LocalServer(NamedTuple):
    """Our server started by `local_server`."""

    url: str
    engine: Any  # the ProcessEngine: its stats, its high-water reset, its process
    worker_pids: list[int]  # the HTTP worker processes beside this one (--api-workers N: N − 1)


def _server_cpu_seconds(server: LocalServer) -> dict[str, float | None]:
    """Every HTTP process together (this one, with the HTTP server's loop and the engine client's reader thread,
    and the extra workers; None if one could not be read) and the engine's process."""
    http = [process_cpu_seconds(), *(process_cpu_seconds(pid) for pid in server.worker_pids)]
    return {"http_process": None if None in http else sum(http),  # type: ignore[arg-type]
            "engine_process": process_cpu_seconds(server.engine.pid)}


def _cores_busy(before: dict[str, float | None], after: dict[str, float | None],
                summary: dict[str, Any]) -> dict[str, float | None]:
    """CPU cores each process kept busy over the point's load (1.0: one core throughout): one near 1.0 in a
    Python process is the interpreter lock's ceiling, whatever the GPU could do (the HTTP processes' sum: near
    their number)."""
    duration = summary["duration_s"]
    busy: dict[str, float | None] = {
        role: (after[role] - before[role]) / duration if before[role] is not None and after[role] is not None
        and duration > 0 else None for role in before}
    busy["load_generator"] = summary.get("client_cpu_cores")
    return busy


@contextlib.contextmanager
def local_server(hf_dir: str, engine_config: Any, http: dict[str, str] | None = None,
                 api_workers: int = 1) -> Iterator[LocalServer]:
    """Our server on a free loopback port: the engine in its own process, uvicorn on a thread here and in
    `api_workers` − 1 worker processes. On exit all stop and the engine's memory is released."""
    import functools

    import uvicorn

    from cs336_systems.serving.api import build_app
    from cs336_systems.serving.api_workers import start_workers, stop_workers
    from cs336_systems.serving.engine_process import ProcessEngine
    from cs336_systems.serving.loader import load_hf_model
    from cs336_systems.serving.serve_cli import bind

    sock = bind("127.0.0.1", 0, reuse_port=api_workers > 1)
    port = sock.getsockname()[1]
    engine = ProcessEngine(functools.partial(load_hf_model, hf_dir), engine_config, extra_clients=api_workers - 1)
    settings = {"log_level": "warning", "access_log": False, "lifespan": "off", **(http or {})}
    server = uvicorn.Server(uvicorn.Config(build_app(engine), **settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="bench-serve-uvicorn", daemon=True)
    workers = []
    try:
        engine.start()
        workers = start_workers(engine, sock, {}, settings)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the in-process server did not start on 127.0.0.1:{port}")
            time.sleep(0.02)
        yield LocalServer(f"http://127.0.0.1:{port}", engine, [worker.pid for worker in workers])
    finally:
        server.should_exit = True
        if thread.is_alive():
            thread.join(timeout=30)
        stop_workers(workers)
        engine.shutdown()
        sock.close()
        del engine
        _release_memory()


def _reset_high_water(engine: Any) -> None:
    """In-process only: start the block manager's high-water mark afresh for the next concurrency level (the
    server is idle between levels), so `/metrics` gives each level's exact peak. A server behind --url keeps its
    cumulative mark; the load generator then falls back to sampling `kv_blocks_used`."""
    reset = getattr(engine, "reset_high_water", None)
    if reset is not None:
        reset()


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ one model
def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    # uvicorn's "auto" takes uvloop and httptools when importable: the HTTP process's cost per chunk depends on it
    env["http_stack"] = {name: _installed(name) for name in ("uvicorn", "uvloop", "httptools")}
    if torch.cuda.is_available():
        env["device"] = "cuda"
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        env["device"] = "cpu"
        env["gpu"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def _installed(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _skipped(system: str, concurrency: int, n: int, why: str) -> dict[str, Any]:
    return {"system": system, "concurrency": concurrency, "num_requests": n, "status": why}


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {text[0][:160] if text else ''}"


def benchmark_model(
    name: str,
    hf_dir: str | None,
    info: dict[str, Any],
    *,
    concurrency: list[int],
    num_requests: list[int],
    prompt_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int,
    baselines: list[str],
    url: str | None = None,
    engine_config: Any = None,
    http: dict[str, str] | None = None,
    api_workers: int = 1,
    timeout_s: float = 600.0,
    deadline: float = math.inf,
    log: Any = print,
) -> dict[str, Any]:
    """Every (system, concurrency) point for one model: the server (ours in-process from `hf_dir` with
    `api_workers` HTTP processes, unless `url`), then each baseline loaded from `hf_dir`. Past `deadline`
    (time.monotonic) points are recorded as skipped."""
    import torch

    from cs336_systems.serving import baselines as bl
    from cs336_systems.serving.bench_models import kv_bytes_per_token
    from cs336_systems.serving.loadgen import RequestSpec, make_workload, run_load_in_subprocess

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    dtype_bytes = 2 if cuda else 4
    bpt = kv_bytes_per_token(hf_dir, dtype_bytes) if hf_dir is not None else None
    info = {**info, "dtype": str(dtype).removeprefix("torch."), "kv_bytes_per_token": bpt}
    workloads = {c: make_workload(n, prompt_len_range, output_len_range, seed)
                 for c, n in zip(concurrency, num_requests, strict=True)}
    contiguous = {c: (max(bl.contiguous_kv_bytes(b, bpt) for b in bl.static_batches(w, c)) if bpt else None)
                  for c, w in workloads.items()}
    points: list[dict[str, Any]] = []

    def measure_server(server_url: str, ours: LocalServer | None) -> None:
        # The load generator runs in a process of its own: parsing thousands of streamed chunks a second must not
        # take the server's interpreter lock (the server's own HTTP work stays in, as it would in production).
        warm = [RequestSpec(list(range(1, 9)), 4), RequestSpec(list(range(1, 17)), 4)]
        run_load_in_subprocess(server_url, warm, 2, timeout_s=timeout_s)  # graphs, kernels: out of the timings
        for c, wl in workloads.items():
            if time.monotonic() > deadline:
                points.append(_skipped("server", c, len(wl), "skipped: time budget"))
                continue
            engine = ours.engine if ours is not None else None
            _reset_high_water(engine)
            before = _server_cpu_seconds(ours) if ours is not None else None
            started = time.monotonic()
            summary = run_load_in_subprocess(server_url, wl, c, timeout_s=timeout_s).summary()
            if before is not None:
                summary["cpu_cores"] = _cores_busy(before, _server_cpu_seconds(ours), summary)
                # the one HTTP process that answers (each worker samples its own loop)
                summary["loop_stalls"] = _loop_stalls(server_url, started)
            _server_point(summary, c, engine)

    def _server_point(summary: dict[str, Any], c: int, engine: Any) -> None:
        kv = summary["kv_blocks"]
        block_bytes = kv.get("block_bytes")
        if block_bytes is None and engine is not None:
            block_bytes = engine.stats().kv_bytes_per_block
        if block_bytes is None and bpt is not None and kv.get("block_size"):
            block_bytes = kv["block_size"] * bpt
        kv["block_bytes"] = block_bytes
        summary["kv_used_bytes"] = kv["peak"] * block_bytes if kv.get("peak") is not None and block_bytes else None
        summary["kv_contiguous_bytes"] = contiguous[c]
        summary["status"] = "ok" if summary["errors"] < summary["num_requests"] else _first(summary)
        points.append(summary)
        lag = summary.get("event_loop_lag_max_ms")
        cores = ", ".join(f"{role} {busy:.2f}" for role, busy in (summary.get("cpu_cores") or {}).items()
                          if busy is not None)
        stalls = summary.get("loop_stalls") or {}
        top = (stalls.get("stacks") or [{}])[0].get("stack")
        log(f"[{name}] server c={c}: {summary['output_tokens_per_s']:.0f} tok/s, ITL p99 "
            f"{summary['itl_ms']['p99']:.2f} ms, {summary['errors']} errors"
            + (f", event loop lag max {lag:.1f} ms" if lag is not None else "")
            + (f"; CPU cores busy: {cores}" if cores else "")
            + (f"; {stalls['samples']} loop stalls, most often at {' < '.join(reversed(top[-3:]))}" if top else ""))
        if kv.get("block_size"):
            info["block_size"] = int(kv["block_size"])

    if url is not None:
        measure_server(url, None)
    else:
        started = time.monotonic()  # start-up includes compiling and capturing graphs: reported, not timed below
        info["api_workers"] = api_workers
        with local_server(hf_dir, engine_config, http, api_workers) as ours:
            info["server_startup_s"] = round(time.monotonic() - started, 2)
            log(f"[{name}] server up in {info['server_startup_s']:.1f} s ({api_workers} HTTP processes)")
            measure_server(ours.url, ours)
            del ours  # the KV pool goes when the server stops, before the baselines load

    for system in baselines:
        if hf_dir is None:
            points += [_skipped(system, c, len(w), "skipped: no model given") for c, w in workloads.items()]
            continue
        model = None
        try:
            device = "cuda" if cuda else "cpu"
            if system == "engine":
                started = time.monotonic()
                model = bl.load_engine(hf_dir, engine_config)
                info["engine_startup_s"] = round(time.monotonic() - started, 2)
                log(f"[{name}] in-process engine up in {info['engine_startup_s']:.1f} s")

                def run(wl: list[RequestSpec], c: int, model: Any = model) -> dict[str, Any]:
                    result = bl.run_engine_offline(model, wl, c)
                    block_bytes = model.runner.kv_bytes_per_block
                    result["kv"] = {"contiguous_bytes_max": contiguous[c], "block_bytes": block_bytes}
                    result["kv_used"] = result["kv_blocks_high_water"] * block_bytes
                    return result
            elif system == "hf":
                model = bl.load_hf_causal_lm(hf_dir, device, dtype)
                eos = info.get("eos_token_id") or 0

                def run(wl: list[RequestSpec], c: int, model: Any = model, eos: int = eos) -> dict[str, Any]:
                    return bl.run_hf_generate(model, wl, c, pad_token_id=eos, bytes_per_token=bpt)
            else:
                model = bl.load_ours(hf_dir, device, dtype)

                def run(wl: list[RequestSpec], c: int, model: Any = model) -> dict[str, Any]:
                    return bl.run_nonpaged(model, wl, c)
            bl.warm_up(system, model, info.get("eos_token_id") or 0, bpt)
            for c, wl in workloads.items():
                if time.monotonic() > deadline:
                    points.append(_skipped(system, c, len(wl), "skipped: time budget"))
                    continue
                try:
                    result = run(wl, c)
                except torch.OutOfMemoryError as e:
                    points.append(_skipped(system, c, len(wl), _error(e)))
                    _release_memory()
                    continue
                result["kv_contiguous_bytes"] = result["kv"]["contiguous_bytes_max"]
                result["kv_used_bytes"] = result.pop("kv_used", None)
                result["status"] = "ok"
                points.append(result)
                log(f"[{name}] {system} c={c}: {result['output_tokens_per_s']:.0f} tok/s, ITL p99 "
                    f"{result['itl_ms']['p99']:.2f} ms")
        finally:
            del model
            _release_memory()
    return {"name": name, "info": info, "points": points}


def _first(summary: dict[str, Any]) -> str:
    return f"error: every request failed ({summary.get('first_error')})"


def write_outputs(results: dict[str, Any], out_json: Path, out_md: Path, fig: Path) -> None:
    from cs336_systems.serving.report import figure, markdown

    for path, text in [(out_json, json.dumps(results, indent=1, default=str)), (out_md, markdown(results))]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(text)
        print(f"wrote {path}")
    if figure(results, fig):
        print(f"wrote {fig}")


def engine_config_from(args: argparse.Namespace) -> Any:
    from cs336_systems.serving.engine import EngineConfig

    try:
        return EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                            max_num_seqs=args.max_num_seqs or max(args.concurrency), **speed_settings(args))
    except ValueError as e:
        raise UserError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    check_settings(args)
    baselines = parse_baselines(args.baselines)
    levels = requests_per_level(args.concurrency, args.num_requests)
    engine_config = engine_config_from(args) if args.url is None else None
    deadline = time.monotonic() + args.time_budget
    with tempfile.TemporaryDirectory(prefix="cs336-bench-serve-") as tmp:
        hf_dir, info, name = materialize(args, tmp)
        model = benchmark_model(
            name, hf_dir, info, concurrency=args.concurrency, num_requests=levels,
            prompt_len_range=tuple(args.prompt_len_range), output_len_range=tuple(args.output_len_range),
            seed=args.seed, baselines=baselines, url=args.url, engine_config=engine_config,
            http=http_settings(args), api_workers=args.api_workers, timeout_s=args.timeout_s, deadline=deadline,
        )
    results = {"env": environment(), "workload": workload_info(args, levels), "models": [model]}
    write_outputs(results, args.out_json, args.out_md, args.fig)
    return 0


def workload_info(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    return {"seed": args.seed, "prompt_len_range": list(args.prompt_len_range),
            "output_len_range": list(args.output_len_range), "concurrency": list(args.concurrency),
            "num_requests": dict(zip(args.concurrency, levels, strict=True)), "sampling": "greedy, ignore_eos",
            "http": http_settings(args)}


def materialize(args: argparse.Namespace, tmp: str) -> tuple[str | None, dict[str, Any], str]:
    """(HF folder every system loads, model info, display name) for the chosen source."""
    from cs336_systems.serving.bench_models import write_random_preset

    if args.hf_model is not None:
        cfg = json.loads((Path(args.hf_model) / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        info = {"source": f"Hugging Face folder {args.hf_model}",
                "eos_token_id": eos[0] if isinstance(eos, list) else eos,
                "context_length": cfg.get("max_position_embeddings"), "parameters": _param_count(args.hf_model)}
        return args.hf_model, info, Path(args.hf_model).name
    if args.preset is not None:
        info = write_random_preset(Path(tmp) / "hf", args.preset, context_length=args.context_length)
        return info["hf_dir"], info, f"{args.preset} (random weights)"
    if args.run_dir is not None:
        from cs336_basics.hf import export_hf

        tokenizer = args.tokenizer or str(Path(args.run_dir).resolve().parent / "tokenizer")
        summary = export_hf(args.run_dir, tokenizer, Path(tmp) / "hf")
        info = {"source": f"run {args.run_dir}", "eos_token_id": summary["eos_token_id"],
                "parameters": summary["parameters"]}
        return summary["out_dir"], info, Path(args.run_dir).name
    return None, {"source": f"server at {args.url}"}, args.url


def _param_count(hf_dir: str) -> int | None:
    try:
        from safetensors import safe_open

        total = 0
        for path in Path(hf_dir).glob("*.safetensors"):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    total += math.prod(f.get_slice(key).get_shape())
        return total or None
    except Exception:
        return None
