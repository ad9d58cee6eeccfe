"""Where a serving engine's GPU time goes: its prefill passes and its decode windows under torch.profiler.

The serving benchmark reports, per engine run, seconds in prefill passes and in decode windows (at 64 streams
on the 134M Llama: 8.2 ms per ~700-token pass, 9.3 ms per four-step window). This script takes the same
engine and shapes apart:

- prefill: `ModelRunner.prefill` of `--prefill-rows` prompts of `--prefill-len` tokens, wall ms per pass
  (synchronised, median of `--repeats`), and under the profiler the kernels launched per pass, the GPU's busy
  ms per pass and the top kernels: a pass whose wall time far exceeds its busy time is host-bound;
- decode: `--num-seqs` requests of `--prompt-len` tokens decoding together, and then `--windows` engine steps
  (decode windows of `--decode-steps` steps) profiled: wall ms per window, kernels and busy ms per window.

    python assignment2-systems/benchmarks/serving_gpu_profile.py --out /tmp/serving_profile.json
    python assignment2-systems/benchmarks/serving_gpu_profile.py --compile-prefill --compile-decode --out ...
    python assignment2-systems/benchmarks/serving_gpu_profile.py --tiny --out /tmp/p.json       # CPU check

Prints a table and writes JSON. `--tiny` (a tiny random model on the CPU) checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from cs336_basics.cli_support import atomic_write
from cs336_systems.benchmarking.common import sync


def build(args) -> tuple:
    from cs336_systems.serving.engine import EngineConfig, LLMEngine
    from cs336_systems.serving.loader import load_hf_model, tiny_served_model

    if args.tiny:
        served, device = tiny_served_model(num_kv_heads=2), "cpu"
    else:
        from cs336_systems.serving.bench_models import write_random_llama

        folder = tempfile.mkdtemp(prefix="cs336-serving-profile-")
        write_random_llama(folder)
        served, device = load_hf_model(folder, "llama-125m"), None
    config = EngineConfig(device=device, max_num_seqs=args.num_seqs, decode_steps=args.decode_steps,
                          prefill_delay_steps=0, async_scheduling=args.async_scheduling,
                          compile_prefill=args.compile_prefill, compile_decode=args.compile_decode)
    return LLMEngine(served, config), served


def kernel_summary(prof, passes: int, top: int) -> dict:
    """Device kernels of a profile: count and busy ms per pass, and the top kernels by total time."""
    times: Counter = Counter()
    counts: Counter = Counter()
    for event in prof.events():
        # not the device copies of record_function ranges: they span kernels already counted
        if (event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0
                and not getattr(event, "is_user_annotation", False)):
            times[event.name] += event.device_time_total
            counts[event.name] += 1
    busy_ms = sum(times.values()) / 1e3
    return {"kernels_per_pass": sum(counts.values()) / passes, "busy_ms_per_pass": busy_ms / passes,
            "top": [{"kernel": name[:120], "ms_per_pass": t / 1e3 / passes, "launches_per_pass": counts[name] / passes}
                    for name, t in times.most_common(top)]}


def profiled(device: torch.device, fn, passes: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(passes):
            fn()
        sync(device)
    summary = kernel_summary(prof, passes, top) if device.type == "cuda" else {}
    summary["aten_calls_per_pass"] = sum(1 for e in prof.events()
                                         if e.device_type == torch.autograd.DeviceType.CPU
                                         and e.name.startswith("aten::")) / passes
    return summary


def median_wall_ms(fn, repeats: int, device: torch.device, warmup: int = 3) -> float:
    """Median synchronised wall ms of `fn` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    walls = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        walls.append(1e3 * (time.perf_counter() - start))
    return statistics.median(walls)


def prefill_part(engine, args, device: torch.device) -> dict:
    from cs336_systems.serving.block_manager import SCRATCH_BLOCK

    runner = engine.runner
    rows = [[(11 * r + 3 * t) % 200 + 32 for t in range(args.prefill_len)] for r in range(args.prefill_rows)]
    # every token's keys/values into the scratch block: the pass's work without taking blocks from the engine
    slots = [[SCRATCH_BLOCK * runner.block_size + t % runner.block_size for t in range(len(r))] for r in rows]

    def one():
        runner.prefill(rows, slots)

    wall = median_wall_ms(one, args.repeats, device)
    out = {"rows": args.prefill_rows, "tokens_per_row": args.prefill_len, "wall_ms_per_pass": wall,
           "compiled": bool(runner.prefill_forward is not None and runner.prefill_forward.compiled)}
    out.update(profiled(device, one, args.repeats, args.top))
    return out


def decode_part(engine, args, device: torch.device) -> dict:
    from cs336_systems.serving.params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    for i in range(args.num_seqs):
        engine.add_request(f"r{i}", [(7 * i + j) % 200 + 32 for j in range(args.prompt_len)], params)
    while engine.stats().num_waiting > 0:  # every prompt prefilled, every sequence decoding
        engine.step()
    wall = median_wall_ms(engine.step, args.windows, device)
    out = {"sequences": engine.stats().num_running, "decode_steps_per_window": args.decode_steps,
           "compiled": engine.runner.decode_forward is not None, "wall_ms_per_window": wall}
    out.update(profiled(device, engine.step, args.windows, args.top))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (checks the script)")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--prefill-rows", type=int, default=3)
    p.add_argument("--prefill-len", type=int, default=240)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--compile-prefill", action="store_true")
    p.add_argument("--compile-decode", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
                   help="off by default: each window is then timed whole, from its launch to its tokens")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for name in ("num_seqs", "prompt_len", "max_tokens", "decode_steps", "windows", "prefill_rows", "prefill_len",
                 "repeats", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tiny:
        torch.set_num_threads(1)
        args.num_seqs, args.prompt_len, args.max_tokens = min(args.num_seqs, 4), min(args.prompt_len, 12), 64
        args.prefill_len, args.windows, args.repeats = min(args.prefill_len, 16), min(args.windows, 3), 2
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --tiny for a CPU check of the script)")
    if args.max_tokens < args.decode_steps * (args.windows + 8):
        p.error("--max-tokens must cover the warm-up and the profiled windows (decode-steps x (windows + 8))")

    engine, served = build(args)
    device = engine.runner.device
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": served.name,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "prefill": prefill_part(engine, args, device), "decode": decode_part(engine, args, device)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as f:
        json.dump(result, f, indent=1)
    pre, dec = result["prefill"], result["decode"]
    print(f"{result['device']}, {served.name}")
    print("| part | shape | wall ms | busy ms | kernels | aten calls |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| prefill pass{' (compiled)' if pre['compiled'] else ''} | {pre['rows']} x {pre['tokens_per_row']} tokens "
          f"| {pre['wall_ms_per_pass']:.2f} | {pre.get('busy_ms_per_pass', float('nan')):.2f} | "
          f"{pre.get('kernels_per_pass', float('nan')):.0f} | {pre['aten_calls_per_pass']:.0f} |")
    compiled = " (compiled)" if dec["compiled"] else ""
    print(f"| decode window{compiled} | {dec['sequences']} sequences x {dec['decode_steps_per_window']} steps | "
          f"{dec['wall_ms_per_window']:.2f} | {dec.get('busy_ms_per_pass', float('nan')):.2f} | "
          f"{dec.get('kernels_per_pass', float('nan')):.0f} | {dec['aten_calls_per_pass']:.0f} |")
    for part in ("prefill", "decode"):
        for k in result[part].get("top", []):
            print(f"  {part}: {k['ms_per_pass']:.3f} ms, {k['launches_per_pass']:.1f}x  {k['kernel']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
