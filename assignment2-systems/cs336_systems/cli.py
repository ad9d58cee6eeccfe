"""`cs336-systems` console script: one subcommand per tool, each defined in its own module.

A module joins by exposing `add_arguments(parser)` and `run(args) -> int`, listed in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib

# subcommand -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench-attention": (
        "cs336_systems.benchmarking.attention_cli",
        "time FlashAttention-2 (ours) against naive PyTorch and SDPA backends; write JSON, Markdown, figure",
    ),
    "bench-model": (
        "cs336_systems.benchmarking.model_cli",
        "time forward, forward+backward and AdamW steps of the LM over model sizes; write JSON, Markdown, figure",
    ),
    "mixed-precision": (
        "cs336_systems.benchmarking.precision_cli",
        "the handout's accumulation experiment (fp32/fp16/bf16 sums) and autocast dtypes of its toy model",
    ),
    "bench-allreduce": (
        "cs336_systems.benchmarking.allreduce_cli",
        "all-reduce time and bandwidth over sizes, world sizes and backends; write JSON, Markdown, figure",
    ),
    "bench-ddp": (
        "cs336_systems.benchmarking.ddp_cli",
        "step time, communication and hidden share of each DDP variant, and memory per rank; JSON, Markdown, figure",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cs336-systems", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    raise SystemExit(main())
