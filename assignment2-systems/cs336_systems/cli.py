"""`cs336-systems` console script: one subcommand per tool, each defined in its own module.

A module joins by exposing `add_arguments(parser)` and `run(args) -> int`, listed in COMMANDS.

What every subcommand shares lives here: the error boundary (one `cs336-systems: error:` line and exit 2 for
bad values and files, a traceback only for bugs), declared ranges of the numeric flags (checked before any
benchmark starts), and outputs that survive a failed run unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cs336_basics.cli_support import UserError, run_command
from cs336_basics.cli_support.ranges import Range
from cs336_systems.serving.engine_args import MAX_API_WORKERS

PROG = "cs336-systems"

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
    "serve": (
        "cs336_systems.serving.serve_cli",
        "an OpenAI-compatible server (continuous batching, paged KV cache) for a trained run or a Hugging Face folder",
    ),
    "bench-serve": (
        "cs336_systems.serving.bench_cli",
        "load-test the server (tokens/s, TTFT, inter-token latency, KV blocks) vs HF generate; JSON, Markdown, figure",
    ),
}


# Valid ranges of the numeric flags, by argparse dest (a list flag's every value is checked); every float flag
# also rejects NaN and infinity.
RANGES: dict[str, Range] = {
    "warmup": Range(ge=0), "iters": Range(ge=1), "steps": Range(ge=1), "rep": Range(ge=1),
    "leaderboard_rep": Range(ge=1), "time_budget": Range(gt=0), "time_budget_s": Range(gt=0),
    "timeout_s": Range(gt=0), "world_sizes": Range(ge=1), "world_size": Range(ge=1), "sizes_mb": Range(gt=0),
    "bucket_sizes_mb": Range(gt=0), "context": Range(ge=1), "contexts": Range(ge=1), "batch_size": Range(ge=1),
    "vocab_size": Range(ge=1), "comm_iters": Range(ge=1), "snapshot_steps": Range(ge=1),
    "snapshot_max_entries": Range(ge=1), "n": Range(ge=1), "value": Range(),
    "concurrency": Range(ge=1), "num_requests": Range(ge=1), "decode_steps": Range(ge=1, le=64),
    "prefill_delay_steps": Range(ge=0), "max_num_seqs": Range(ge=1), "block_size": Range(ge=1),
    "num_blocks": Range(ge=2), "port": Range(ge=1, le=65535), "max_num_batched_tokens": Range(ge=1),
    "max_body_bytes": Range(ge=1), "api_workers": Range(ge=1, le=MAX_API_WORKERS),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
        p.set_defaults(_run=module.run, _flags=flags)
    return parser


def check_numeric_flags(args: argparse.Namespace) -> None:
    """Every numeric flag within its declared range (a float flag at least finite), the flag named."""
    for dest, flag in args._flags.items():
        value = getattr(args, dest, None)
        values = value if isinstance(value, list) else [value]
        rule = RANGES.get(dest, Range())
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if not rule.holds(v):
                raise UserError(f"{flag} must be {rule.describe()}, got {v}")


def _protected(args: argparse.Namespace) -> tuple[list[Path], str]:
    """The folders a subcommand writes and the file-name prefix of what it writes there."""
    render = getattr(args, "render", None)
    out_dir = getattr(args, "out_dir", None)
    if args.command == "bench-attention" and out_dir is None:
        from cs336_systems.benchmarking.attention_cli import FIG_DIR, RESULTS_DIR

        folders = [Path(FIG_DIR), Path(RESULTS_DIR)]
    else:
        folders = [Path(out_dir)] if out_dir is not None else []
    prefix = Path(render).stem if render is not None else getattr(args, "stem", None) or "fa2_"
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out-dir {folder} is a file; expected a folder")
    return folders, prefix


@contextmanager
def outputs_kept_on_failure(folders: list[Path], prefix: str) -> Iterator[dict[str, Any]]:
    """The subcommands write their reports in place; copies of the files they would replace are taken first and
    put back when the command fails (an exception, or a non-zero exit), so a failed run leaves earlier results
    byte-identical. Files the failed run added (partial results) stay."""
    backup = Path(tempfile.mkdtemp(prefix="cs336-systems-backup-"))
    saved: list[tuple[Path, Path]] = []
    state: dict[str, Any] = {"ok": False}
    try:
        for i, folder in enumerate(folders):
            if folder.is_dir():
                for file in sorted(folder.iterdir()):
                    if file.is_file() and file.name.startswith(prefix):
                        copy = backup / f"{i}_{file.name}"
                        shutil.copy2(file, copy)
                        saved.append((file, copy))
        yield state
    finally:
        if not state["ok"]:
            for original, copy in saved:
                os.replace(copy, original)
        shutil.rmtree(backup, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    """Checks, then the subcommand with its outputs protected; a `SystemExit("message")` the subcommands use for
    bad settings becomes a `UserError` (one line, exit 2)."""
    check_numeric_flags(args)
    folders, prefix = _protected(args)
    render = getattr(args, "render", None)
    if render is not None and not Path(render).is_file():
        if not Path(render).exists():
            raise FileNotFoundError(f"--render {render}: no such file")
        raise UserError(f"--render {render} is not a file")
    with outputs_kept_on_failure(folders, prefix) as state:
        try:
            code = args._run(args)
        except SystemExit as e:
            if isinstance(e.code, str):
                raise UserError(e.code.strip().splitlines()[0] if e.code.strip() else "failed") from None
            raise
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            if render is None:  # not reading the user's file: a bug, keep the traceback
                raise
            raise UserError(f"--render {render}: not a {args.command} results file "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        state["ok"] = code == 0
    return code


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand behind the shared error boundary (`run_command`): exit 2 with one line for expected
    failures, 130 for Ctrl-C, the subcommand's own code otherwise."""
    args = build_parser().parse_args(argv)
    result = {"code": 0}

    def call() -> None:
        result["code"] = _run(args)

    return run_command(PROG, call) or result["code"]


if __name__ == "__main__":
    raise SystemExit(main())
