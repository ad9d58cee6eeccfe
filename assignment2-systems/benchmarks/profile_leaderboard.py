"""Where the leaderboard forward+backward time goes: each kernel's time inside the real loop, the idle gaps
between them, and the host (Python) cost of one forward and one backward call.

    PYTHONPATH=assignment1-basics:assignment2-systems python3 assignment2-systems/benchmarks/profile_leaderboard.py

`do_bench` times each step from an event recorded after an L2 flush; kernels the host has not yet launched by
then leave the GPU idle inside the timed window. This script measures those gaps with torch.profiler instead
of inferring them from the difference between end-to-end and per-kernel timings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from cs336_systems.benchmarking.attention import LEADERBOARD, _inputs
from cs336_systems.flash_attention import FlashAttentionTriton
from cs336_systems.flash_attention import triton_impl as ti


def leaderboard_step():
    """One forward+backward of our Triton attention on the benchmark's leaderboard inputs."""
    lb = LEADERBOARD
    q, k, v, do = _inputs((lb["batch"], lb["heads"], lb["seq"], lb["d"]), getattr(torch, lb["dtype"]))

    def step():
        torch.autograd.grad(FlashAttentionTriton.apply(q, k, v, lb["causal"]), (q, k, v), do)

    return step


def host_cost_us(n_calls: int = 300) -> dict[str, float]:
    """Host microseconds per call on a tiny shape, where the GPU finishes each kernel long before the host
    launches the next: this is the launch path's own cost (checks, allocation, autotuner, argument binding)."""
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    out = {}
    for _ in range(20):
        o = FlashAttentionTriton.apply(q, k, v, True)
        torch.autograd.grad(o, (q, k, v), do)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_calls):
        o = FlashAttentionTriton.apply(q, k, v, True)
    torch.cuda.synchronize()
    out["forward_us"] = (time.perf_counter() - t0) / n_calls * 1e6
    o = FlashAttentionTriton.apply(q, k, v, True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_calls):
        torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    torch.cuda.synchronize()
    out["backward_us"] = (time.perf_counter() - t0) / n_calls * 1e6
    return out


def profile_steps(steps: int) -> dict:
    """Kernel durations and gaps over `steps` leaderboard forward+backward steps, each after an L2 flush."""
    from torch.profiler import ProfilerActivity, profile

    step = leaderboard_step()
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")

    for _ in range(3):  # autotuning happens here, outside the trace
        step()
    torch.cuda.synchronize()
    starts, ends = [], []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            starts.append(s)
            ends.append(e)
        torch.cuda.synchronize()
    event_ms = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    kernels = sorted(
        (ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0),
        key=lambda ev: ev.time_range.start,
    )
    ours = [ev for ev in kernels if ev.name.startswith("flash_")]
    per_name: dict[str, list[float]] = {}
    for ev in ours:
        per_name.setdefault(ev.name, []).append(ev.device_time / 1e3)
    # a step = fwd, dq, dkdv in launch order; the gap is idle GPU time between consecutive kernels of a step
    n_per_step = len(per_name)
    gaps, busy, span = [], [], []
    for i in range(0, len(ours) - n_per_step + 1, n_per_step):
        group = ours[i:i + n_per_step]
        busy.append(sum(ev.device_time for ev in group) / 1e3)
        span.append((group[-1].time_range.end - group[0].time_range.start) / 1e3)
        gaps.append([(b.time_range.start - a.time_range.end) / 1e3 for a, b in itertools.pairwise(group)])
    return {
        "kernels_ms": {name: statistics.median(ts) for name, ts in per_name.items()},
        "kernel_sum_ms": statistics.median(busy),
        "gaps_between_kernels_ms": [statistics.median(g[j] for g in gaps) for j in range(n_per_step - 1)],
        "first_to_last_kernel_ms": statistics.median(span),
        "event_step_ms": statistics.median(event_ms),
        "configs": {kind: str(fn.best_config) for (kind, *_), fn in ti._tuned_cache.items()
                    if getattr(fn, "best_config", None) is not None} or "first of each list",
    }


def sustained_ms(reps_ms: list[int]) -> dict[str, float]:
    """do_bench medians of the leaderboard step over growing repetition windows: a GPU that holds its clock
    gives the same number for each, one that throttles under sustained load gets slower with the window."""
    from triton.testing import do_bench

    step = leaderboard_step()
    out = {}
    for rep in reps_ms:
        out[str(rep)] = do_bench(step, warmup=100, rep=rep, return_mode="median")
        print(f"  do_bench rep {rep:5d} ms: {out[str(rep)]:.3f} ms per step", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--autotune", action="store_true", help="tune the tile lists first (default: their heads)")
    p.add_argument("--sustained", type=int, nargs="*", default=[], metavar="REP_MS",
                   help="also time the step with do_bench over these repetition windows (ms)")
    args = p.parse_args()
    ti.set_autotune(args.autotune)
    result = {"host": host_cost_us(), **profile_steps(args.steps)}
    print(f"host cost per call: forward {result['host']['forward_us']:.0f} us, "
          f"backward {result['host']['backward_us']:.0f} us")
    for name, ms in result["kernels_ms"].items():
        print(f"  {name:32s} {ms:7.3f} ms")
    print(f"kernel sum {result['kernel_sum_ms']:.3f} ms, gaps between them "
          f"{', '.join(f'{g * 1e3:.0f} us' for g in result['gaps_between_kernels_ms'])}, "
          f"first kernel start to last kernel end {result['first_to_last_kernel_ms']:.3f} ms, "
          f"event-timed step {result['event_step_ms']:.3f} ms")
    print("configs:", result["configs"])
    if args.sustained:
        result["sustained_ms"] = sustained_ms(args.sustained)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
