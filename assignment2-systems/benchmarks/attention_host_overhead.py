"""Why the grid's small shapes are slow for us: host time per call against GPU kernel time per call.

At batch 1, one head and a few thousand tokens an attention call is microseconds of GPU work, so
`do_bench` (which times a stream of calls with CUDA events) measures whichever side is slower: the GPU or the
host issuing the calls. This script measures both sides separately for each implementation, forward (autograd
on) and backward (`torch.autograd.grad` on a retained graph):

- host µs per call: `--calls` calls issued back to back on the host clock, no sync between them (the GPU runs
  far ahead of nothing here: its queue never fills at these shapes);
- GPU µs per call: the kernels' summed device time per call from `torch.profiler`;
- and, for our Triton backward, where the host time goes (`cProfile`, cumulative, top functions).

`triton` runs our Triton path with its launch cache on (`triton_impl.set_launch_cache(True)`: a tuned shape
launches its chosen configs directly), `triton_tuner_dispatch` with it off (every call through
`triton.autotune`'s dispatch, the default for now): the two rows of one run are the difference the cache makes.

    PYTHONPATH=assignment1-basics:assignment2-systems \
        python3 assignment2-systems/benchmarks/attention_host_overhead.py \
        --out $OUT/attention_host_overhead.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pstats
import statistics
import time
from pathlib import Path

import torch

from cs336_systems.benchmarking.attention import ALL_IMPLS, _inputs, environment, make_impl
from cs336_systems.benchmarking.common import round_robin

DEFAULT_IMPLS = ["triton", "triton_tuner_dispatch", "fa3", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"]
# our Triton path, every call through the autotuner's dispatch (its launch cache off)
TUNER_DISPATCH = "triton_tuner_dispatch"


def host_us_per_call(run, calls: int) -> float:
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def gpu_us_per_call(run, calls: int) -> float:
    """Summed device time of the kernels (and memsets/copies) that `calls` calls launch, per call."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    # device-side events only (kernels, memsets, copies), not the GPU copies of annotation ranges
    device_us = sum(e.time_range.end - e.time_range.start for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA
                    and not getattr(e, "is_user_annotation", False))
    return device_us / calls


def host_profile(run, calls: int, top: int) -> list[dict]:
    """cProfile of `calls` host calls: the functions with the most cumulative time, µs per call."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        run()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
        rows.append({"function": f"{Path(filename).name}:{line}({name})", "cum_us_per_call": cumulative / calls * 1e6,
                     "calls_per_call": _nc / calls})
    rows.sort(key=lambda r: -r["cum_us_per_call"])
    return rows[:top]


def measure(name: str, seq: int, d: int, calls: int, profile_top: int) -> dict:
    if name in ("triton", TUNER_DISPATCH):
        from cs336_systems.flash_attention import triton_impl

        before = triton_impl._settings["launch_cache"]
        triton_impl.set_launch_cache(name == "triton")
        try:
            return {**_measure("triton", seq, d, calls, profile_top if name == "triton" else 0), "impl": name}
        finally:
            triton_impl.set_launch_cache(before)
    return _measure(name, seq, d, calls, profile_top)


TIMES = ("fwd_host_us", "fwd_gpu_us", "bwd_host_us", "bwd_gpu_us")


def measure_rounds(names: list[str], seq: int, args: argparse.Namespace, profile_top: int) -> list[dict]:
    """Every implementation measured once per round, the order rotated between rounds (`round_robin`); the row
    keeps each time's median over the rounds and every round's value (`<time>_rounds`). Host time drifts from one
    minute to the next on the GPU machines (SDPA cuDNN's forward at 4 096 tokens: 55 µs a call in one run, 188
    in another), so a single pass in a fixed order charges the drift to whichever implementation ran then."""
    first: dict[str, dict] = {}  # each implementation's first row: its status, and the host profile if asked

    def timed(name: str) -> dict[str, float]:
        row = measure(name, seq, args.d, args.calls, 0 if name in first else profile_top)
        first.setdefault(name, row)
        return {key: row.get(key, math.nan) for key in TIMES}

    _, _, samples = round_robin(names, args.rounds, timed)
    rows = []
    for name, runs in samples.items():
        row = dict(first[name])
        if row["status"] == "ok" and not any(math.isnan(run[key]) for run in runs for key in TIMES):
            for key in TIMES:
                row[f"{key}_rounds"] = [run[key] for run in runs]
                row[key] = statistics.median(row[f"{key}_rounds"])
        elif row["status"] == "ok":
            row = {"impl": name, "seq": seq, "d": args.d, "status": "n/a: failed in a later round"}
        rows.append(row)
    return rows


def _measure(name: str, seq: int, d: int, calls: int, profile_top: int) -> dict:
    fn, ctx = make_impl(name)
    q, k, v, do = _inputs((1, 1, seq, d), torch.bfloat16)
    row: dict = {"impl": name, "seq": seq, "d": d}
    try:
        with ctx:
            forward = lambda: fn(q, k, v, True)
            row["fwd_host_us"] = host_us_per_call(forward, calls)
            row["fwd_gpu_us"] = gpu_us_per_call(forward, calls)
            o = fn(q, k, v, True)
            backward = lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
            row["bwd_host_us"] = host_us_per_call(backward, calls)
            row["bwd_gpu_us"] = gpu_us_per_call(backward, calls)
            if profile_top and name == "triton":
                row["bwd_host_profile"] = host_profile(backward, calls, profile_top)
                row["fwd_host_profile"] = host_profile(forward, calls, profile_top)
        row["status"] = "ok"
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        row["status"] = f"n/a: {str(e).splitlines()[0][:100]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS)
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 1024, 4096])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile-top", type=int, default=14, help="cProfile rows of our Triton calls (0: none)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per length, the order rotated between them")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1 or args.d not in (16, 32, 64, 128) or min(args.seqs) < 1:
        parser.error("--calls ≥ 1, --rounds ≥ 1, --d one of 16/32/64/128, every --seqs ≥ 1")
    unknown = sorted(set(args.impls) - set(ALL_IMPLS) - {TUNER_DISPATCH})
    if unknown:
        parser.error(f"unknown --impls {unknown}; choose from {[*ALL_IMPLS, TUNER_DISPATCH]}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    rows = []
    print(f"batch 1, one head, d {args.d}, bf16, causal; µs per call, host issue time | GPU kernel time; "
          f"median of {args.rounds} rounds, order rotated")
    print(f"{'impl':<22}{'seq':>7}{'fwd host':>10}{'fwd gpu':>9}{'bwd host':>10}{'bwd gpu':>9}")
    for seq in args.seqs:
        for row in measure_rounds(args.impls, seq, args, args.profile_top if seq == args.seqs[0] else 0):
            rows.append(row)
            name = row["impl"]
            if row["status"] != "ok":
                print(f"{name:<22}{seq:>7}  {row['status']}")
                continue
            print(f"{name:<22}{seq:>7}{row['fwd_host_us']:>10.1f}{row['fwd_gpu_us']:>9.1f}"
                  f"{row['bwd_host_us']:>10.1f}{row['bwd_gpu_us']:>9.1f}")
    for row in rows:
        for part in ("fwd", "bwd"):
            if f"{part}_host_profile" in row:
                print(f"\nwhere our Triton {part} spends host time (seq {row['seq']}; cumulative µs per call):")
                for r in row[f"{part}_host_profile"]:
                    print(f"  {r['cum_us_per_call']:8.1f}  ×{r['calls_per_call']:<5.1f} {r['function']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "d": args.d, "calls": args.calls,
                                    "rounds": args.rounds, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
