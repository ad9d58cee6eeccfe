"""`python -m cs336_alignment.demo --preset h200 --out-dir DIR [--set key=value ...]`: one seeded run of the
demonstration. `--save-start F` keeps the SFT model, `--start-only` stops there, `--start-from F` begins GRPO
from such a file (the learning-rate sweep's runs share one start). Several runs at once:
`python -m cs336_alignment.demo.multi`."""

import argparse
import os
from dataclasses import replace

from cs336_alignment.demo.config import PRESETS, DemoConfig, preset
from cs336_basics.cli_support import UserError, run_command


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


PROG = "python -m cs336_alignment.demo"


def _as_override(message: str) -> str:
    """Range errors name fields as flags (`--grpo-lr`); here they are set with `--set grpo_lr=...`."""
    if message.startswith("--"):
        name, _, rest = message[2:].partition(" ")
        key = name.replace("-", "_")
        if key in DemoConfig.__dataclass_fields__:
            return f"--set {key}: {rest}"
    return message


def _config(args: argparse.Namespace) -> DemoConfig:
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        raise UserError("--time-budget-s must be positive")
    try:
        config = preset(args.preset, args.set)
        if args.time_budget_s is not None:
            config = replace(config, time_budget_s=args.time_budget_s)
    except UserError as e:
        raise UserError(_as_override(str(e))) from None
    except ValueError as e:  # the preset's own override errors
        raise UserError(str(e)) from None
    return replace(config, device=args.device) if args.device else config


def _run(args: argparse.Namespace) -> None:
    config = _config(args)
    if args.start_only and not args.save_start:
        raise UserError("--start-only needs --save-start FILE")
    if args.start_from and not os.path.isfile(args.start_from):
        raise UserError(f"--start-from {args.start_from}: no such file")
    if args.start_from and args.save_start:
        raise UserError("--start-from and --save-start exclude each other")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir} is a file; expected a folder")
    if args.save_start and os.path.isdir(args.save_start):
        raise UserError(f"--save-start {args.save_start} is a folder; expected a file path")
    from cs336_alignment.demo.pipeline import StartMismatch, run_demo

    try:
        results = run_demo(config, args.out_dir, start_from=args.start_from, save_start_to=args.save_start,
                           start_only=args.start_only)
    except StartMismatch as e:
        raise UserError(str(e)) from None
    if args.start_only:
        print(f"demo: SFT start written to {args.save_start}")
        return
    from cs336_alignment.demo.report import markdown_summary

    print(markdown_summary(results))


def main(argv: list[str] | None = None) -> int:
    """The shared error boundary: bad settings and files end in one line and exit 2, Ctrl-C in exit 130."""
    args = parse_args(argv)
    return run_command(PROG, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
