"""All-reduce benchmark (handout §2.1): float32 tensors of 1 MiB … 1 GiB, several world sizes, gloo on CPU and
NCCL on GPUs, one process per rank.

Per iteration every rank times its own synchronised all-reduce; the iteration's time is the slowest rank's
(the collective is done when the last rank is). Algorithm bandwidth = bytes / time; bus bandwidth = algorithm
bandwidth × 2(n−1)/n, the share of link bandwidth a ring all-reduce uses (the nccl-tests convention), so
it is comparable across world sizes.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cs336_systems.benchmarking.common import FIG_DIR, free_port, short_error, sync

BACKENDS = ["gloo", "nccl"]
MIB = 2**20


@dataclass
class AllReduceConfig:
    """One sweep over (backend, world size); each launch times every tensor size."""

    backends: list[str] = field(default_factory=lambda: ["gloo"])
    world_sizes: list[int] = field(default_factory=lambda: [2])
    sizes_mb: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0])
    warmup: int = 5
    iters: int = 10
    start_method: str = "spawn"
    timeout_s: float = 300.0
    out_dir: Path = FIG_DIR
    stem: str = "allreduce_bench"

    def validate(self) -> None:
        if not self.backends or not self.world_sizes or not self.sizes_mb:
            raise ValueError("backends, world sizes and sizes must not be empty")
        for b in self.backends:
            if b not in BACKENDS:
                raise ValueError(f"backend {b!r} is not one of {BACKENDS}")
        if any(w < 2 for w in self.world_sizes):
            raise ValueError(f"world sizes must be at least 2, got {self.world_sizes}")
        if any(s <= 0 for s in self.sizes_mb):
            raise ValueError(f"sizes must be positive MiB, got {self.sizes_mb}")
        if self.iters <= 0 or self.warmup < 0:
            raise ValueError(f"need iters > 0 and warmup >= 0, got {self.iters} and {self.warmup}")
        if self.start_method not in ("spawn", "fork", "forkserver"):
            raise ValueError(f"start method must be spawn, fork or forkserver, got {self.start_method!r}")
        if "nccl" in self.backends and self.start_method == "fork":
            raise ValueError("nccl workers must not inherit CUDA state: use --start-method spawn")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")


def init_process_group(rank: int, world: int, port: int, backend: str, timeout_s: float) -> torch.device:
    """Join the group on 127.0.0.1:port; NCCL ranks each take their own GPU first."""
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def _worker(rank: int, world: int, port: int, backend: str, cfg: AllReduceConfig, out: dict) -> None:
    device = init_process_group(rank, world, port, backend, cfg.timeout_s)
    try:
        per_size = []
        for size_mb in cfg.sizes_mb:
            numel = max(1, int(size_mb * MIB) // 4)
            x = torch.randn(numel, device=device, dtype=torch.float32)
            for _ in range(cfg.warmup):
                dist.all_reduce(x)
            sync(device)
            times = []
            for _ in range(cfg.iters):
                dist.barrier()
                sync(device)
                t0 = time.perf_counter()
                dist.all_reduce(x)
                sync(device)  # NCCL's all_reduce returns once queued; the work is done only after this
                times.append(time.perf_counter() - t0)
            per_size.append((size_mb, numel * 4, times))
            del x
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, per_size)
        if rank == 0:
            out["ranks"] = gathered
    finally:
        dist.destroy_process_group()


def summarize_run(ranks: list[list[tuple[float, int, list[float]]]], world: int) -> list[dict[str, Any]]:
    """Per size: the slowest rank's time each iteration, its mean/std, and the two bandwidths."""
    rows = []
    for i, (size_mb, nbytes, _) in enumerate(ranks[0]):
        per_iter = [max(r[i][2][k] for r in ranks) for k in range(len(ranks[0][i][2]))]
        mean = statistics.fmean(per_iter)
        algbw = nbytes / mean / 1e9
        rows.append({
            "size_mb": size_mb, "bytes": nbytes, "mean_ms": mean * 1e3,
            "std_ms": (statistics.stdev(per_iter) if len(per_iter) > 1 else 0.0) * 1e3,
            "min_ms": min(per_iter) * 1e3, "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (world - 1) / world,
        })
    return rows


def run_one(cfg: AllReduceConfig, backend: str, world: int) -> dict[str, Any]:
    """One launch of `world` processes; failures and missing GPUs become a status, not an exception."""
    run: dict[str, Any] = {"backend": backend, "world_size": world}
    if backend == "nccl" and torch.cuda.device_count() < world:
        run["status"] = f"skipped: needs {world} GPUs, {torch.cuda.device_count()} visible"
        return run
    manager = mp.Manager()
    out = manager.dict()
    try:
        mp.start_processes(_worker, args=(world, free_port(), backend, cfg, out), nprocs=world, join=True,
                           start_method=cfg.start_method)
        run["rows"] = summarize_run(out["ranks"], world)
        run["status"] = "ok"
    except Exception as e:  # a rank died (OOM, timeout, backend unavailable): record and go on
        run["status"] = short_error(e)
    finally:
        manager.shutdown()
    return run


def run_sweep(cfg: AllReduceConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from cs336_systems.benchmarking.common import environment

    runs = []
    for backend, world in tqdm([(b, w) for b in cfg.backends for w in cfg.world_sizes], desc="bench-allreduce"):
        run = run_one(cfg, backend, world)
        runs.append(run)
        if run["status"] == "ok":
            cells = "  ".join(f"{r['size_mb']:g}MiB={r['mean_ms']:.3f}ms/{r['busbw_gbps']:.1f}GB/s"
                              for r in run["rows"])
        else:
            cells = run["status"]
        tqdm.write(f"  {backend} world={world}: {cells}")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}
    return {"env": environment("cuda" if "nccl" in cfg.backends else "cpu"), "config": config, "runs": runs}
