"""DDP benchmark (handout §2.2–2.3, §3): per-step time of each DDP variant on the cs336_basics LM, the time
each exposes for gradient communication, and how much of its communication backward hides; then memory per
rank with plain AdamW, ZeRO-1 (`ShardedOptimizer`) and FSDP against the theoretical figures.

Phases are timed with CUDA events on the compute stream (host timers on CPU), so timing does not add
synchronisation that would stop communication from overlapping backward:
  exposed communication = end of backward → end of `finish_gradient_synchronization`;
  communication alone   = the same collectives (per parameter, one flat buffer, or per bucket) timed back to
                          back on the step's real gradients, with nothing to overlap;
  hidden share          = 1 − exposed / communication alone.
A "none" variant (no wrapper, no communication) gives the compute-only step for comparison.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cs336_systems.benchmarking.common import FIG_DIR, free_port, mib, nvtx_range, short_error, sync
from cs336_systems.benchmarking.model_sizes import MODEL_SIZES, VOCAB_SIZE, model_config, theoretical_bytes

VARIANTS = ["none", "naive", "flat", "individual", "bucketed"]
MEMORY_SETUPS = ["adamw", "zero1", "fsdp"]
PHASES = ["forward", "backward", "grad_sync", "optimizer"]


@dataclass
class DDPBenchConfig:
    """Model, variants and launch settings; batch_size is per rank (the global batch is world × it)."""

    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    bucket_sizes_mb: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0])
    size: str = "xl"
    context: int = 128
    batch_size: int = 4
    vocab_size: int = VOCAB_SIZE
    precision: str = "fp32"
    backend: str = "nccl"
    world_size: int = 2
    warmup: int = 3
    steps: int = 5
    comm_iters: int = 3
    memory: list[str] = field(default_factory=lambda: list(MEMORY_SETUPS))
    start_method: str = "spawn"
    timeout_s: float = 600.0
    out_dir: Path = FIG_DIR
    stem: str = "ddp_bench"

    def validate(self) -> None:
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"variant {v!r} is not one of {VARIANTS}")
        for m in self.memory:
            if m not in MEMORY_SETUPS:
                raise ValueError(f"memory setup {m!r} is not one of {MEMORY_SETUPS}")
        if not self.variants and not self.memory:
            raise ValueError("nothing to run: no variants and no memory setups")
        if "bucketed" in self.variants and (not self.bucket_sizes_mb or any(b <= 0 for b in self.bucket_sizes_mb)):
            raise ValueError(f"bucket sizes must be positive MiB, got {self.bucket_sizes_mb}")
        if self.size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {self.size!r}; choose from {list(MODEL_SIZES)}")
        for name in ("context", "batch_size", "vocab_size", "steps", "comm_iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {self.backend!r}")
        if self.world_size < 2:
            raise ValueError(f"world size must be at least 2, got {self.world_size}")
        if self.backend == "nccl" and torch.cuda.device_count() < self.world_size:
            raise ValueError(f"nccl with world size {self.world_size} needs that many GPUs; "
                             f"{torch.cuda.device_count()} visible (use --backend gloo)")
        if self.start_method not in ("spawn", "fork", "forkserver"):
            raise ValueError(f"start method must be spawn, fork or forkserver, got {self.start_method!r}")
        if self.backend == "nccl" and self.start_method == "fork":
            raise ValueError("nccl workers must not inherit CUDA state: use --start-method spawn")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")

    def variant_specs(self) -> list[tuple[str, float | None]]:
        """(label, bucket MiB or None) for each run; bucketed expands into one run per bucket size."""
        out: list[tuple[str, float | None]] = []
        for v in self.variants:
            if v == "bucketed":
                out += [(f"bucketed {b:g} MiB", b) for b in self.bucket_sizes_mb]
            else:
                out.append((v, None))
        return out


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def bucket_partition(params: list[torch.nn.Parameter], bucket_mb: float) -> list[list[torch.nn.Parameter]]:
    """Reverse parameter order, a new bucket whenever the next tensor would overflow: the usual rule, written
    here independently so the communication-alone timing needs no private state of the DDP class."""
    limit = bucket_mb * 2**20
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0.0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if not buckets or (size + nbytes > limit and buckets[-1]):
            buckets.append([])
            size = 0.0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def _wrap(variant: str, bucket_mb: float | None, model: torch.nn.Module) -> torch.nn.Module:
    from cs336_systems import distributed as D

    if variant == "none":
        return model
    name = {"naive": "DDPNaive", "flat": "DDPFlat", "individual": "DDPIndividualParameters",
            "bucketed": "DDPBucketed"}[variant]
    cls = getattr(D, name, None)
    if cls is None:
        raise RuntimeError(f"cs336_systems.distributed has no {name}")
    return cls(model, bucket_size_mb=bucket_mb) if variant == "bucketed" else cls(model)


class _Clock:
    """Marks on the compute stream (CUDA events) or host time (CPU); durations in ms between marks."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def _batch(cfg: DDPBenchConfig, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own shard of the global batch
    shape = (cfg.batch_size, cfg.context)
    return (torch.randint(0, cfg.vocab_size, shape, device=device, generator=g),
            torch.randint(0, cfg.vocab_size, shape, device=device, generator=g))


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, precision: str, sync_grads: bool) -> dict[str, float]:
    """One step; per-phase ms (PHASES) and the host wall time of the whole step ("total")."""
    from cs336_basics.nn_utils import cross_entropy

    sync(device)
    t0 = time.perf_counter()
    clock = _Clock(device)
    if hasattr(model, "reset"):
        model.reset()
    opt.zero_grad(set_to_none=True)
    clock.mark()
    with nvtx_range("forward"), _autocast(device, precision):
        loss = cross_entropy(model(x), y)
    clock.mark()
    with nvtx_range("backward"):
        loss.backward()
    clock.mark()
    with nvtx_range("grad_sync"):
        if sync_grads:
            model.finish_gradient_synchronization()
    clock.mark()
    with nvtx_range("optimizer_step"):
        opt.step()
    clock.mark()
    sync(device)
    total = (time.perf_counter() - t0) * 1e3
    return {**dict(zip(PHASES, clock.durations(), strict=True)), "total": total}


def comm_alone(variant: str, bucket_mb: float | None, params: list[torch.nn.Parameter], device: torch.device,
               iters: int) -> float:
    """Mean ms of the variant's collectives back to back on the current gradients (nothing to overlap)."""
    grads = [p.grad for p in params if p.grad is not None]
    if variant == "none" or not grads:
        return 0.0
    if variant in ("naive", "individual"):
        tensors = [g.clone() for g in grads]
    elif variant == "flat":
        tensors = [torch._utils._flatten_dense_tensors(grads)]
    else:
        tensors = [torch._utils._flatten_dense_tensors([p.grad for p in b if p.grad is not None])
                   for b in bucket_partition(params, bucket_mb or math.inf)]
    times = []
    for i in range(iters + 1):  # the first round warms up
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        for t in tensors:
            dist.all_reduce(t)
        sync(device)
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.fmean(times)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_variant(cfg: DDPBenchConfig, rank: int, device: torch.device, label: str, bucket_mb: float | None
                 ) -> dict[str, Any]:
    from cs336_basics.model import TransformerLM
    from cs336_basics.optim import AdamW

    variant = label.split()[0]
    torch.manual_seed(0)
    model = TransformerLM(model_config(cfg.size, cfg.context, cfg.vocab_size), device=device)
    wrapped = _wrap(variant, bucket_mb, model)
    opt = AdamW(wrapped.parameters(), lr=1e-4)
    x, y = _batch(cfg, rank, device)
    steps = []
    with nvtx_range(f"ddp {label}"):
        for i in range(cfg.warmup + cfg.steps):
            s = train_step(wrapped, opt, x, y, device, cfg.precision, sync_grads=variant != "none")
            if i >= cfg.warmup:
                steps.append(s)
    alone = comm_alone(variant, bucket_mb, _trainable(model), device, cfg.comm_iters)
    out = {"label": label, "variant": variant, "bucket_mb": bucket_mb, "steps": steps, "comm_alone_ms": alone}
    del model, wrapped, opt, x, y
    _free(device)
    return out


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _state_tensors(opt: torch.optim.Optimizer):
    for o in (opt, getattr(opt, "optimizer", None)):
        if o is not None:
            for state in o.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def measure_memory(cfg: DDPBenchConfig, rank: int, world: int, device: torch.device, setup: str
                   ) -> dict[str, Any]:
    """Memory after init, peak before and after the optimizer step (2 steps), and the bytes held in
    parameters, gradients and optimizer state; theoretical figures from the parameter count."""
    from cs336_basics.model import TransformerLM
    from cs336_basics.optim import AdamW
    from cs336_systems import distributed as D

    cuda = device.type == "cuda"

    def peak() -> float | None:
        return mib(torch.cuda.max_memory_allocated(device)) if cuda else None

    _free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = TransformerLM(model_config(cfg.size, cfg.context, cfg.vocab_size), device=device)
    n_params = sum(p.numel() for p in _trainable(model))
    if setup == "fsdp":
        fsdp_cls = getattr(D, "FSDP", None)
        if fsdp_cls is None:
            return {"setup": setup, "status": "unavailable: cs336_systems.distributed has no FSDP"}
        compute = torch.bfloat16 if cfg.precision == "bf16" else None
        wrapped = fsdp_cls(model, compute_dtype=compute)
    else:
        wrapped = D.DDPIndividualParameters(model)
    params = _trainable(wrapped)
    opt = (D.ShardedOptimizer(params, AdamW, lr=1e-4) if setup == "zero1" else AdamW(params, lr=1e-4))
    x, y = _batch(cfg, rank, device)
    # FSDP builds the full model before sharding it: the build's peak is kept apart from the training peaks
    row: dict[str, Any] = {"setup": setup, "status": "ok", "init_peak_mib": peak(),
                           "after_init_mib": mib(torch.cuda.memory_allocated(device)) if cuda else None}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        s = train_step_parts(wrapped, opt, x, y, device, cfg.precision)
        row["before_step_peak_mib"], row["after_step_peak_mib"] = s
    row["params_mib"] = mib(_tensor_bytes(params))
    row["grads_mib"] = mib(_tensor_bytes(p.grad for p in params if p.grad is not None))
    row["optimizer_state_mib"] = mib(_tensor_bytes(_state_tensors(opt)))
    sharding = {"adamw": "none", "zero1": "zero1", "fsdp": "fsdp"}[setup]
    row["theory_mib"] = {k: mib(v) for k, v in theoretical_bytes(n_params, world, sharding).items()}
    row["n_params"] = n_params
    del model, wrapped, opt, params, x, y
    _free(device)
    return row


def train_step_parts(model, opt, x, y, device: torch.device, precision: str) -> tuple[float | None, float | None]:
    """One step; peak allocated MiB just before and just after the optimizer step (None on CPU)."""
    from cs336_basics.nn_utils import cross_entropy

    opt.zero_grad(set_to_none=True)
    with _autocast(device, precision):
        loss = cross_entropy(model(x), y)
    loss.backward()
    model.finish_gradient_synchronization()
    sync(device)
    cuda = device.type == "cuda"
    before = mib(torch.cuda.max_memory_allocated(device)) if cuda else None
    opt.step()
    sync(device)
    after = mib(torch.cuda.max_memory_allocated(device)) if cuda else None
    return before, after


def _worker(rank: int, world: int, port: int, cfg: DDPBenchConfig, out: dict) -> None:
    from cs336_systems.benchmarking.allreduce import init_process_group

    device = init_process_group(rank, world, port, cfg.backend, cfg.timeout_s)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        timings, memory = [], []
        for label, bucket_mb in cfg.variant_specs():
            try:
                timings.append(time_variant(cfg, rank, device, label, bucket_mb))
            except Exception as e:  # OOM or a missing class: recorded, the other variants still run
                timings.append({"label": label, "status": "OOM" if "out of memory" in str(e).lower()
                                else short_error(e)})
                _free(device)
        for setup in cfg.memory:
            try:
                memory.append(measure_memory(cfg, rank, world, device, setup))
            except Exception as e:
                memory.append({"setup": setup, "status": "OOM" if "out of memory" in str(e).lower()
                               else short_error(e)})
                _free(device)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"timings": timings, "memory": memory})
        if rank == 0:
            out["ranks"] = gathered
    finally:
        dist.destroy_process_group()


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean_ms": statistics.fmean(values), "std_ms": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: per step the slowest rank's value of each phase, then mean/std over steps; the hidden share
    of communication; memory rows per rank."""
    variants = []
    for i, r0 in enumerate(ranks[0]["timings"]):
        per_rank = [r["timings"][i] for r in ranks]
        if any("steps" not in t for t in per_rank):
            variants.append({"label": r0["label"], "status": next(t["status"] for t in per_rank if "status" in t)})
            continue
        row: dict[str, Any] = {"label": r0["label"], "variant": r0["variant"], "bucket_mb": r0["bucket_mb"],
                               "status": "ok"}
        for key in [*PHASES, "total"]:
            per_step = [max(t["steps"][k][key] for t in per_rank) for k in range(len(r0["steps"]))]
            row[key] = _stat(per_step)
        row["comm_alone_ms"] = max(t["comm_alone_ms"] for t in per_rank)
        exposed = row["grad_sync"]["mean_ms"]
        row["hidden_share"] = (max(0.0, min(1.0, 1 - exposed / row["comm_alone_ms"]))
                               if row["comm_alone_ms"] > 0 else None)
        variants.append(row)
    base = next((v for v in variants if v.get("variant") == "none" and v["status"] == "ok"), None)
    for v in variants:
        if base is not None and v.get("status") == "ok":
            v["overhead_vs_none_ms"] = v["total"]["mean_ms"] - base["total"]["mean_ms"]
    memory = [{"rank": rank, **m} for rank, r in enumerate(ranks) for m in r["memory"]]
    return {"variants": variants, "memory": memory}


def run_bench(cfg: DDPBenchConfig) -> dict[str, Any]:
    """Launch world_size processes once; every variant and memory setup runs inside that launch."""
    from dataclasses import asdict

    from cs336_systems.benchmarking.common import environment

    manager = mp.Manager()
    out = manager.dict()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    results: dict[str, Any] = {"env": environment("cuda" if cfg.backend == "nccl" else "cpu"), "config": config}
    mcfg = model_config(cfg.size, cfg.context, cfg.vocab_size)
    from cs336_systems.benchmarking.model_sizes import parameter_count

    results["n_params"] = parameter_count(mcfg)
    try:
        mp.start_processes(_worker, args=(cfg.world_size, free_port(), cfg, out), nprocs=cfg.world_size,
                           join=True, start_method=cfg.start_method)
        results.update(summarize(out["ranks"]))
        results["status"] = "ok"
    except Exception as e:  # a rank died: keep what the JSON can say
        results["status"] = short_error(e)
        results.setdefault("variants", [])
        results.setdefault("memory", [])
    finally:
        manager.shutdown()
    return results
