"""`python -m cs336_alignment.demo --preset h200 --out-dir DIR [--time-budget-s S] [--set key=value ...]`."""

import argparse
import sys
from dataclasses import replace

from cs336_alignment.demo.config import PRESETS, preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cs336_alignment.demo", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--time-budget-s", type=float, help="whole-run wall budget (stages get fixed shares)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a DemoConfig field")
    args = parser.parse_args(argv)
    try:
        config = preset(args.preset, args.set)
    except ValueError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    if args.time_budget_s is not None:
        if args.time_budget_s <= 0:
            print("demo: error: --time-budget-s must be positive", file=sys.stderr)
            return 2
        config = replace(config, time_budget_s=args.time_budget_s)
    if args.device:
        config = replace(config, device=args.device)
    from cs336_alignment.demo.pipeline import run_demo

    results = run_demo(config, args.out_dir)
    from cs336_alignment.demo.report import markdown_summary

    print(markdown_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
