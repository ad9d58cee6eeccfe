"""End-to-end timing of the `cs336_basics` LM (handout §1.1.3–1.1.6): forward, forward+backward and a full
AdamW training step over model sizes and context lengths, fp32 or bf16 autocast, eager or `torch.compile`,
with NVTX ranges for Nsight Systems, peak memory and optional CUDA memory-history snapshots.

Random weights and random tokens: only speed and memory are measured. Each step is followed by a device
synchronisation, so a step's wall time is its GPU time plus launch overhead.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cs336_systems.benchmarking.common import FIG_DIR, mib, nvtx_range, short_error, summarize, sync
from cs336_systems.benchmarking.model_sizes import MODEL_SIZES, VOCAB_SIZE, model_config, parameter_count

MODES = ["forward", "forward_backward", "train_step"]
PRECISIONS = ["fp32", "bf16"]
COMPILE_MODES = ["eager", "compiled"]


@dataclass
class ModelBenchConfig:
    """One sweep: every (size, context, precision, compile mode) point is timed in every mode."""

    sizes: list[str] = field(default_factory=lambda: ["small"])
    contexts: list[int] = field(default_factory=lambda: [128])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    compile_modes: list[str] = field(default_factory=lambda: ["eager"])
    batch_size: int = 4
    vocab_size: int = VOCAB_SIZE
    warmup: int = 5
    steps: int = 10
    device: str = "cuda"
    forward_no_grad: bool = False
    memory_snapshot: Path | None = None
    snapshot_steps: int = 2
    snapshot_max_entries: int = 200_000
    time_budget_s: float = math.inf
    out_dir: Path = FIG_DIR
    stem: str = "model_bench"

    def validate(self) -> None:
        """Raise ValueError with a one-line message for the first bad field."""
        for name in ("sizes", "contexts", "modes", "precisions", "compile_modes"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for s in self.sizes:
            if s not in MODEL_SIZES:
                raise ValueError(f"unknown model size {s!r}; choose from {list(MODEL_SIZES)}")
        for name, allowed in (("modes", MODES), ("precisions", PRECISIONS), ("compile_modes", COMPILE_MODES)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: {bad[0]!r} is not one of {allowed}")
        for name in ("batch_size", "vocab_size", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if any(c <= 0 for c in self.contexts):
            raise ValueError(f"context lengths must be positive, got {self.contexts}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.snapshot_steps <= 0 or self.snapshot_max_entries <= 0:
            raise ValueError("snapshot_steps and snapshot_max_entries must be positive")
        if self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA GPU is visible (use --device cpu)")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")


def _is_oom(e: BaseException) -> bool:
    """torch.compile wraps a CUDA OOM in its own exception types; the message still says so."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(
    mode: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    device: torch.device, precision: str, forward_no_grad: bool,
) -> Callable[[], None]:
    """One step of `mode` with NVTX ranges around forward, backward and the optimizer step."""
    from cs336_basics.nn_utils import cross_entropy

    def forward() -> None:
        grad_ctx = torch.no_grad() if forward_no_grad else contextlib.nullcontext()
        with nvtx_range("forward"), grad_ctx, _autocast(device, precision):
            model(x)

    def forward_backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        with nvtx_range("forward"), _autocast(device, precision):
            loss = cross_entropy(model(x), y)
        with nvtx_range("backward"):
            loss.backward()

    def train_step() -> None:
        forward_backward()
        with nvtx_range("optimizer_step"):
            optimizer.step()

    return {"forward": forward, "forward_backward": forward_backward, "train_step": train_step}[mode]


def _snapshot_path(base: Path, tag: str, single: bool) -> Path:
    return base if single else base.with_name(f"{base.stem}_{tag}{base.suffix or '.pickle'}")


def time_mode(
    step: Callable[[], None], cfg: ModelBenchConfig, device: torch.device, label: str,
    snapshot: Path | None = None,
) -> dict[str, Any]:
    """Warm-up, then `steps` synchronised timed steps; peak memory; optionally a memory-history pickle
    covering the first `snapshot_steps` measured steps (their timings carry the recording's overhead)."""
    cuda = device.type == "cuda"
    warm: list[float] = []
    with nvtx_range(f"warmup {label}"):
        for _ in range(cfg.warmup):
            t0 = timeit.default_timer()
            step()
            sync(device)
            warm.append(timeit.default_timer() - t0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    recording = snapshot is not None and cuda
    if recording:
        torch.cuda.memory._record_memory_history(max_entries=cfg.snapshot_max_entries, stacks="python")
    times: list[float] = []
    with nvtx_range(f"measure {label}"):
        for i in range(cfg.steps):
            t0 = timeit.default_timer()
            with nvtx_range(f"step {i}"):
                step()
            sync(device)
            times.append(timeit.default_timer() - t0)
            if recording and i + 1 == min(cfg.snapshot_steps, cfg.steps):
                snapshot.parent.mkdir(parents=True, exist_ok=True)
                torch.cuda.memory._dump_snapshot(str(snapshot))
                torch.cuda.memory._record_memory_history(enabled=None)
                recording = False
                print(f"wrote memory snapshot {snapshot}", flush=True)
    row: dict[str, Any] = {"status": "ok", **summarize(times), "warmup_ms": [t * 1e3 for t in warm]}
    if cuda:
        row["peak_allocated_mib"] = mib(torch.cuda.max_memory_allocated(device))
        row["peak_reserved_mib"] = mib(torch.cuda.max_memory_reserved(device))
    if snapshot is not None and cuda:
        row["memory_snapshot"] = str(snapshot)
        row["snapshot_steps"] = min(cfg.snapshot_steps, cfg.steps)
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_point(cfg: ModelBenchConfig, size: str, context: int, precision: str, compile_mode: str) -> dict[str, Any]:
    """All requested modes at one point; an OOM (at build or in a mode) is recorded, never raised."""
    from cs336_basics.model import TransformerLM
    from cs336_basics.optim import AdamW

    device = torch.device(cfg.device)
    mcfg = model_config(size, context, cfg.vocab_size)
    point: dict[str, Any] = {"size": size, "context": context, "precision": precision, "compile": compile_mode,
                             "params": parameter_count(mcfg), "modes": {}}
    model = optimizer = compiled = None
    try:
        torch.manual_seed(0)
        model = TransformerLM(mcfg, device=device)
        optimizer = AdamW(model.parameters(), lr=1e-4)
        compiled = torch.compile(model) if compile_mode == "compiled" else model
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, context), device=device, generator=gen)
        y = torch.randint(0, cfg.vocab_size, (cfg.batch_size, context), device=device, generator=gen)
        if device.type == "cuda":
            point["model_mib"] = mib(torch.cuda.memory_allocated(device))
    except Exception as e:  # OOM while building, or anything else: recorded for every mode
        status = "OOM" if _is_oom(e) else short_error(e)
        point["modes"] = {m: {"status": status} for m in cfg.modes}
    if point["modes"]:
        model = optimizer = compiled = None
        _free(device)
        return point
    single = cfg.memory_snapshot is not None and len(cfg.modes) == 1
    for mode in cfg.modes:
        label = f"{size} ctx{context} {precision} {compile_mode} {mode}"
        tag = f"{size}_ctx{context}_{precision}_{compile_mode}_{mode}"
        snap = _snapshot_path(cfg.memory_snapshot, tag, single) if cfg.memory_snapshot else None
        try:
            step = make_step(mode, compiled, optimizer, x, y, device, precision, cfg.forward_no_grad)
            point["modes"][mode] = time_mode(step, cfg, device, label, snap)
        except Exception as e:  # OOM mid-mode or a compile failure: record it and go on
            if device.type == "cuda" and snap is not None:
                torch.cuda.memory._record_memory_history(enabled=None)
            point["modes"][mode] = {"status": "OOM" if _is_oom(e) else short_error(e)}
        if point["modes"][mode]["status"] != "ok":  # outside the handler: its traceback no longer pins tensors
            optimizer.zero_grad(set_to_none=True)
            _free(device)
    model = optimizer = compiled = x = y = None
    if compile_mode == "compiled":
        torch._dynamo.reset()
    _free(device)
    return point


def derived(point: dict[str, Any]) -> dict[str, float]:
    """Backward ≈ (forward+backward) − forward; optimizer step ≈ train step − (forward+backward)."""
    m = point["modes"]

    def mean(k: str) -> float | None:
        return m[k]["mean_ms"] if m.get(k, {}).get("status") == "ok" else None

    out = {}
    f, fb, ts = mean("forward"), mean("forward_backward"), mean("train_step")
    if f is not None and fb is not None:
        out["backward_ms"] = fb - f
    if fb is not None and ts is not None:
        out["optimizer_ms"] = ts - fb
    return out


def run_sweep(
    cfg: ModelBenchConfig, progress: bool = True, on_point: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every point of the sweep, in order, until the time budget runs out (later points: skipped).

    `on_point` gets the results so far after each point (the CLI saves them, so a killed run leaves data)."""
    from tqdm import tqdm

    from cs336_systems.benchmarking.common import environment

    # contexts outermost: when the budget runs out, the longest contexts go first, not the largest models
    points = [(s, c, p, cm) for c in cfg.contexts for s in cfg.sizes for p in cfg.precisions
              for cm in cfg.compile_modes]
    deadline = time.monotonic() + cfg.time_budget_s
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    if math.isinf(cfg.time_budget_s):
        config["time_budget_s"] = None
    results: dict[str, Any] = {"env": environment(cfg.device), "config": config, "rows": []}
    rows = results["rows"]
    for size, context, precision, compile_mode in tqdm(points, desc="bench-model", disable=not progress):
        if time.monotonic() > deadline:
            rows.append({"size": size, "context": context, "precision": precision, "compile": compile_mode,
                         "modes": {m: {"status": "skipped: time budget"} for m in cfg.modes}})
            continue
        point = bench_point(cfg, size, context, precision, compile_mode)
        point.update(derived(point))
        rows.append(point)
        cells = "  ".join(
            f"{m}={r['mean_ms']:.2f}±{r['std_ms']:.2f}ms" if r.get("status") == "ok" else f"{m}={r['status']}"
            for m, r in point["modes"].items()
        )
        tqdm.write(f"  {size} ctx={context} {precision} {compile_mode}: {cells}")
        if on_point is not None:
            on_point(results)
    return results
