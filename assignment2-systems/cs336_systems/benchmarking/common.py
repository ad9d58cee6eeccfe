"""Helpers shared by the model, all-reduce and DDP benchmarks: timing statistics, device sync, NVTX ranges,
environment description and output paths. Kept free of CUDA assumptions so every benchmark also runs on CPU."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import socket
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cs336_basics.cli_support import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[3]
FIG_DIR = REPO_ROOT / "fig"


def free_port() -> int:
    """A TCP port nobody listens on now, so concurrent runs (tests, stages) do not collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels: CUDA calls return before the GPU finishes, so timings need this."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range visible in Nsight Systems; a no-op where CUDA is absent."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def summarize(seconds: list[float]) -> dict[str, float]:
    """Mean, sample std, min and max in milliseconds (std 0 for a single sample)."""
    ms = [s * 1e3 for s in seconds]
    return {
        "mean_ms": statistics.fmean(ms),
        "std_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "min_ms": min(ms),
        "max_ms": max(ms),
        "n": len(ms),
    }


def round_robin(names: list[str], rounds: int, measure: Callable[[str], dict[str, float]]
                ) -> tuple[dict[str, dict[str, float]], list[list[str]], dict[str, list[dict[str, float]]]]:
    """Measures every name once per round, each round starting further along the list, and returns the mean over
    the rounds of each metric per name, the order of each round and every sample. A GPU's clock drifts under
    sustained load, so a single pass in a fixed order charges the drift to whichever implementation runs late;
    with as many rounds as names each name runs once in every position and a steady drift cancels in the mean
    (fewer rounds spread it), while the spread between rounds shows how large it was."""
    if rounds < 1 or not names:
        raise ValueError(f"round_robin needs at least one round and one name, got {rounds} and {names}")
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    orders = []
    for r in range(rounds):
        shift = r * len(names) // rounds
        order = names[shift:] + names[:shift]
        orders.append(order)
        for name in order:
            samples[name].append(measure(name))
    means = {name: {key: statistics.fmean(sample[key] for sample in runs) for key in runs[0]}
             for name, runs in samples.items()}
    return means, orders, samples


def environment(device: str = "cuda") -> dict[str, Any]:
    """What the numbers were measured on: GPU name (or CPU), torch version, date."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        env["gpu"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def write_outputs(out_dir: Path, stem: str, results: dict[str, Any], markdown: str) -> dict[str, Path]:
    """Write `<stem>.json` and `<stem>.md` into out_dir; return their paths (the figure is the caller's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    with atomic_write(paths["json"]) as f:
        f.write(json.dumps(results, indent=1, default=str))
    with atomic_write(paths["md"]) as f:
        f.write(markdown)
    for p in paths.values():
        print(f"wrote {p}")
    return paths


def short_error(e: BaseException) -> str:
    """First line of an exception, bounded, for a results table cell."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:160]}"


def mib(nbytes: float) -> float:
    return nbytes / 2**20
