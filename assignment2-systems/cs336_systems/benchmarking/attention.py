"""Time attention implementations (ours in Triton and PyTorch, naive PyTorch, every SDPA backend) for the
forward, backward and forward+backward passes with `triton.testing.do_bench` (median of event-timed runs).

Grids: "leaderboard" (batch 1, 16 heads, seq 16384, d_head 64, bf16, causal: the course's timing shape),
"quick" (a few shapes) and "full" (the handout's sweep: batch 1, causal, seq 128…65536, d 16…128, bf16 and
float32). Results are plain dicts, written as JSON; `attention_report` renders tables and figures.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from cs336_systems.flash_attention import FlashAttentionPytorch, naive_attention

GRIDS: dict[str, dict[str, Any]] = {
    "quick": {"seqs": [1024, 4096, 16384], "dims": [64, 128], "dtypes": ["bfloat16", "float32"]},
    "full": {
        "seqs": [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536],
        "dims": [16, 32, 64, 128],
        "dtypes": ["bfloat16", "float32"],
    },
}
LEADERBOARD = {"batch": 1, "heads": 16, "seq": 16384, "d": 64, "dtype": "bfloat16", "causal": True}
ALL_IMPLS = ["triton", "fa3", "triton_tma", "triton_concurrent", "triton_atomic", "pytorch_fa2", "naive",
             "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"]
TRITON_MODES = {"triton": "split", "triton_tma": "tma", "triton_concurrent": "concurrent", "triton_atomic": "atomic"}
GRID_IMPLS = ["triton", "fa3", "pytorch_fa2", "naive", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"]
# our PyTorch twin loops over key tiles in Python: past this length a measurement costs seconds
SLOW_IMPL_MAX_SEQ = {"pytorch_fa2": 16384}


def _sdpa(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[backend_name]

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


@contextlib.contextmanager
def _triton_mode(mode: str) -> Iterator[None]:
    from cs336_systems.flash_attention import triton_impl

    old = triton_impl._settings["backward"]
    triton_impl.set_backward_mode(mode)
    try:
        yield
    finally:
        triton_impl.set_backward_mode(old)


def make_impl(name: str) -> tuple[Callable, contextlib.AbstractContextManager]:
    """(attention function (q, k, v, causal) -> o, context to hold while timing it)."""
    if name in TRITON_MODES:
        from cs336_systems.flash_attention import FlashAttentionTriton

        mode = TRITON_MODES[name]
        return FlashAttentionTriton.apply, _triton_mode(mode)
    if name == "fa3":  # the Hopper path (Gluon forward); where it does not apply, the Triton kernels run
        from cs336_systems.flash_attention.hopper_impl import FlashAttentionHopper

        return FlashAttentionHopper.apply, contextlib.nullcontext()
    if name == "pytorch_fa2":
        return FlashAttentionPytorch.apply, _pytorch_tiles(128, 128, 256)
    if name == "naive":
        return naive_attention, contextlib.nullcontext()
    if name.startswith("sdpa_"):
        return _sdpa(name.removeprefix("sdpa_")), contextlib.nullcontext()
    raise ValueError(f"unknown implementation {name!r}; choose from {ALL_IMPLS}")


@contextlib.contextmanager
def _pytorch_tiles(q_tile: int, k_tile: int, bwd_k_tile: int) -> Iterator[None]:
    cls = FlashAttentionPytorch
    old = cls.q_tile, cls.k_tile, cls.backward_k_tile
    cls.q_tile, cls.k_tile, cls.backward_k_tile = q_tile, k_tile, bwd_k_tile
    try:
        yield
    finally:
        cls.q_tile, cls.k_tile, cls.backward_k_tile = old


def attention_flops(batch: int, heads: int, seq: int, d: int, causal: bool) -> dict[str, float]:
    """Matrix-multiply FLOPs: forward 2 products (QKᵀ, PV), backward 5 (S, dV, dP, dQ, dK); causal halves them."""
    one = 2.0 * batch * heads * seq * seq * d * (0.5 if causal else 1.0)
    return {"fwd": 2 * one, "bwd": 5 * one, "fwd_bwd": 7 * one}


def time_passes(
    fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal: bool,
    warmup: int, rep: int,
) -> dict[str, float]:
    """Median ms of forward (autograd on), backward alone (graph retained) and forward+backward."""
    from triton.testing import do_bench

    def bench(f):
        return do_bench(f, warmup=warmup, rep=rep, return_mode="median")

    out: dict[str, float] = {"fwd": bench(lambda: fn(q, k, v, causal))}
    o = fn(q, k, v, causal)
    out["bwd"] = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    o = None  # free the retained graph before the next measurement
    out["fwd_bwd"] = bench(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do))
    return out


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def measure(name: str, shape: tuple[int, ...], dtype: torch.dtype, causal: bool, warmup: int, rep: int) -> dict:
    """One implementation at one shape; errors (OOM, unsupported dtype/backend) become a status string."""
    row: dict[str, Any] = {"impl": name}
    try:
        fn, ctx = make_impl(name)
        q, k, v, do = _inputs(shape, dtype)
        with ctx:
            row.update(time_passes(fn, q, k, v, do, causal, warmup, rep))
        row["status"] = "ok"
        if name == "fa3":  # which kernels ran: "" = the Gluon one, else why it fell back to the Triton kernels
            from cs336_systems.flash_attention.hopper_impl import last_path

            row["fallback"] = {part: why for part, why in last_path.items() if why}
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        row["status"] = f"n/a: {str(e).splitlines()[0][:100]}"
    finally:
        q = k = v = do = None
        torch.cuda.empty_cache()
    return row


def check_against(
    name: str, ref_name: str, shape: tuple[int, ...], dtype: torch.dtype, causal: bool
) -> dict[str, float]:
    """Relative errors of O, dQ, dK, dV of `name` against `ref_name` on the same fresh inputs."""
    q, k, v, do = _inputs(shape, dtype, seed=1)
    results = []
    for n in (name, ref_name):
        fn, ctx = make_impl(n)
        with ctx:
            o = fn(q, k, v, causal)
            results.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    errs = {}
    for label, a, b in zip(("O", "dQ", "dK", "dV"), *results, strict=True):
        a, b = a.float(), b.float()
        errs[label] = ((a - b).norm() / b.norm()).item()
        errs[label + "_finite"] = bool(torch.isfinite(a).all())
    return errs


def compiled_course_harness(shape: tuple[int, ...], dtype: torch.dtype, warmup: int, rep: int) -> float:
    """The course leaderboard's own timing: torch.compile(Function.apply), o.sum().backward() (grads accumulate)."""
    from triton.testing import do_bench

    from cs336_systems.flash_attention import FlashAttentionTriton

    q, k, v, _ = _inputs(shape, dtype)
    flash = torch.compile(FlashAttentionTriton.apply)

    def step():
        flash(q, k, v, True).sum().backward()

    return do_bench(step, warmup=warmup, rep=rep, return_mode="median")


def environment() -> dict[str, Any]:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run_leaderboard(impls: list[str], warmup: int, rep: int, course_harness: bool) -> dict[str, Any]:
    lb = LEADERBOARD
    shape = (lb["batch"], lb["heads"], lb["seq"], lb["d"])
    dtype = getattr(torch, lb["dtype"])
    flops = attention_flops(lb["batch"], lb["heads"], lb["seq"], lb["d"], lb["causal"])
    rows = []
    for name in impls:
        row = measure(name, shape, dtype, lb["causal"], warmup, rep)
        if row["status"] == "ok":
            row["tflops"] = {p: flops[p] / (row[p] * 1e-3) / 1e12 for p in ("fwd", "bwd", "fwd_bwd")}
        rows.append(row)
        print(f"  leaderboard {name:16s} {_fmt_row(row)}", flush=True)
    out: dict[str, Any] = {"shape": lb, "flops": flops, "rows": rows}
    checks = {}
    for name in impls:
        if name.startswith("triton") or name == "fa3":
            for ref in ("sdpa_flash", "sdpa_cudnn"):
                with contextlib.suppress(RuntimeError):
                    checks[f"{name}_vs_{ref}"] = check_against(name, ref, shape, dtype, True)
    out["checks"] = checks
    triton_names = [n for n in impls if n in TRITON_MODES]
    for name in triton_names:
        mode = TRITON_MODES[name]
        if mode in ("split", "tma", "atomic"):
            try:
                table = profile_triton(shape, dtype, True, mode)
                out[f"profile_{mode}"] = table
                print(f"  per-kernel profile ({mode} backward, 5 forward+backward steps):\n{table}")
            except Exception as e:  # the profiler is optional diagnostics
                print(f"  profiler failed: {e}")
    for name in triton_names if course_harness else []:
        key = "course_harness_ms" if name == "triton" else f"course_harness_ms_{name}"
        try:
            with make_impl(name)[1]:
                ms = compiled_course_harness((lb["heads"], lb["seq"], lb["d"]), dtype, warmup, rep)
            out[key] = ms
            print(f"  leaderboard course harness, {name} (torch.compile, (16, 16384, 64), o.sum().backward()): "
                  f"{ms:.3f} ms")
        except Exception as e:  # torch.compile failures are many-typed; report and go on
            out[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            print("  course harness failed:", out[key])
    return out


def run_grid(
    grid: str, impls: list[str], warmup: int, rep: int, deadline: float, causal: bool = True
) -> list[dict[str, Any]]:
    spec = GRIDS[grid]
    rows = []
    for dtype_name in spec["dtypes"]:
        for d in spec["dims"]:
            for seq in spec["seqs"]:
                for name in impls:
                    row: dict[str, Any] = {"dtype": dtype_name, "d": d, "seq": seq}
                    if time.monotonic() > deadline:
                        row.update(impl=name, status="skipped: time budget")
                    elif seq > SLOW_IMPL_MAX_SEQ.get(name, math.inf):
                        row.update(impl=name, status="skipped: too slow at this length")
                    else:
                        row.update(measure(name, (1, 1, seq, d), getattr(torch, dtype_name), causal, warmup, rep))
                    rows.append(row)
                print(f"  {dtype_name:8s} d={d:3d} seq={seq:6d} " + "  ".join(
                    f"{r['impl']}={r['fwd_bwd']:.3f}" for r in rows[-len(impls):] if r.get("status") == "ok"
                ), flush=True)
    return rows


def _fmt_row(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return row.get("status", "?")
    return f"fwd {row['fwd']:8.3f}  bwd {row['bwd']:8.3f}  fwd+bwd {row['fwd_bwd']:8.3f} ms"


def autotune_choices() -> dict[str, str]:
    """The tile configs the autotuner settled on, per (kernel, head dim, float32?, atomic?) and shape key."""
    try:
        from cs336_systems.flash_attention import triton_impl
    except ImportError:
        return {}
    out = {}
    for key, tuner in triton_impl._tuned_cache.items():
        for shape_key, cfg in getattr(tuner, "cache", {}).items():
            out[f"{key} {shape_key}"] = str(cfg)
        timings = getattr(tuner, "configs_timings", None) or {}
        for cfg, ms in timings.items():  # the last tuning's per-config times (median, lower/upper quantiles)
            out[f"{key} last-tuned {cfg}"] = str(ms)
    return out


def profile_triton(shape: tuple[int, ...], dtype: torch.dtype, causal: bool, mode: str = "split") -> str:
    """Per-kernel CUDA time of a few forward+backward steps of our Triton version (torch.profiler table)."""
    from torch.profiler import ProfilerActivity, profile

    fn, ctx = make_impl({mode: name for name, mode in TRITON_MODES.items()}[mode])
    q, k, v, do = _inputs(shape, dtype)
    with ctx:
        for _ in range(3):
            torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60)
