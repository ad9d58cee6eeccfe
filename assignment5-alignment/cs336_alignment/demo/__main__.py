"""`python -m cs336_alignment.demo --preset h200 --out-dir DIR [--set key=value ...]`: one seeded run of the
demonstration. `--save-start F` keeps the SFT model, `--start-only` stops there, `--start-from F` begins GRPO
from such a file (the learning-rate sweep's runs share one start). Several runs at once:
`python -m cs336_alignment.demo.multi`."""

import argparse
import os
import sys
from dataclasses import replace

from cs336_alignment.demo.config import PRESETS, preset


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m cs336_alignment.demo", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--time-budget-s", type=float, help="guard on the whole run's wall time (steps decide)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a DemoConfig field")
    parser.add_argument("--save-start", metavar="FILE", help="write the SFT model (GRPO's start) to FILE")
    parser.add_argument("--start-only", action="store_true", help="stop after writing --save-start")
    parser.add_argument("--start-from", metavar="FILE", help="skip pretraining and SFT: load a --save-start file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def fail(message: str) -> int:
        print(f"demo: error: {message}", file=sys.stderr)
        return 2

    try:
        config = preset(args.preset, args.set)
    except ValueError as e:
        return fail(str(e))
    if args.time_budget_s is not None:
        if args.time_budget_s <= 0:
            return fail("--time-budget-s must be positive")
        config = replace(config, time_budget_s=args.time_budget_s)
    if args.device:
        config = replace(config, device=args.device)
    if args.start_only and not args.save_start:
        return fail("--start-only needs --save-start FILE")
    if args.start_from and not os.path.isfile(args.start_from):
        return fail(f"--start-from {args.start_from}: no such file")
    if args.start_from and args.save_start:
        return fail("--start-from and --save-start exclude each other")
    from cs336_alignment.demo.pipeline import StartMismatch, run_demo

    try:
        results = run_demo(config, args.out_dir, start_from=args.start_from, save_start_to=args.save_start,
                           start_only=args.start_only)
    except StartMismatch as e:
        return fail(str(e))
    if args.start_only:
        print(f"demo: SFT start written to {args.save_start}")
        return 0
    from cs336_alignment.demo.report import markdown_summary

    print(markdown_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
