"""`cs336-systems mixed-precision`: print (and write) the accumulation table and the autocast dtype table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cs336_systems.benchmarking.common import FIG_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1000, help="number of additions (the handout: 1000)")
    p.add_argument("--value", type=float, default=0.01, help="the addend (the handout: 0.01)")
    p.add_argument("--device", default=None, help="device for the autocast probe (default: cuda if present)")
    p.add_argument("--out-dir", type=Path, default=FIG_DIR)
    p.add_argument("--stem", default="mixed_precision")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Mixed-precision accumulation (`cs336-systems mixed-precision`)",
        "",
        f"`s += tensor({results['value']})` {results['n']} times; exact sum {results['n'] * results['value']:g}. "
        "`n × stored addend` is what an exact accumulator would give: the rest of the error is rounding in the sum.",
        "",
        "| accumulator | addend | addend cast first | result | abs error | n × stored addend |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in results["accumulation"]:
        lines.append(f"| {r['accumulator']} | {r['addend']} | {'yes' if r['cast'] else 'no'} | {r['result']:.6f} | "
                     f"{r['abs_error']:.2e} | {r['n_times_stored_addend']:.6f} |")
    probe = results["autocast"]
    lines += ["", f"## ToyModel under `torch.autocast({probe['device']!r}, {probe['dtype']})`", "",
              "| tensor | dtype |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in probe["dtypes"].items()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import torch

    from cs336_systems.benchmarking.common import environment, write_outputs
    from cs336_systems.benchmarking.precision import ACCUMULATION_CASES, accumulate, autocast_dtypes

    if args.n <= 0:
        raise SystemExit(f"mixed-precision: --n must be positive, got {args.n}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"mixed-precision: device must be cpu or cuda (with a GPU), got {device!r}")
    # the handout asks for fp16 autocast on a GPU; CPU autocast supports bf16 only
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    results = {
        "env": environment(device), "n": args.n, "value": args.value,
        "accumulation": [accumulate(a, b, c, args.n, args.value) for a, b, c in ACCUMULATION_CASES],
        "autocast": {"device": device, "dtype": str(dtype).removeprefix("torch."),
                     "dtypes": autocast_dtypes(device, dtype)},
    }
    md = markdown(results)
    write_outputs(args.out_dir, args.stem, results, md)
    print(md)
    return 0
