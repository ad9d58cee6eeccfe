"""`cs336-systems bench-model`: time the cs336_basics LM over the handout's sizes; JSON, Markdown, figure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cs336_basics.cli_support import atomic_write
from cs336_systems.benchmarking.common import FIG_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cs336_systems.benchmarking.lm_bench import COMPILE_MODES, MODES, PRECISIONS
    from cs336_systems.benchmarking.model_sizes import MODEL_SIZES

    p.add_argument("--sizes", nargs="+", default=["small"], metavar="SIZE",
                   help=f"model sizes from {list(MODEL_SIZES)} (tiny: a CPU-sized model)")
    p.add_argument("--contexts", nargs="+", type=int, default=[128], metavar="N", help="context lengths")
    p.add_argument("--modes", nargs="+", default=list(MODES), metavar="MODE", help=f"from {MODES}")
    p.add_argument("--precisions", nargs="+", default=["fp32"], metavar="P",
                   help=f"from {PRECISIONS} (bf16: torch.autocast, fp32 master weights)")
    p.add_argument("--compile", nargs="+", default=["eager"], dest="compile_modes", metavar="C",
                   help=f"from {COMPILE_MODES} (compiled: torch.compile(model))")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before measuring (0 shows why they matter)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--forward-no-grad", action="store_true", help="time the forward pass under torch.no_grad")
    p.add_argument("--memory-snapshot", type=Path, default=None, metavar="PATH",
                   help="write a CUDA memory-history pickle for each point and mode (https://pytorch.org/memory_viz)")
    p.add_argument("--snapshot-steps", type=int, default=2, help="measured steps the snapshot covers")
    p.add_argument("--snapshot-max-entries", type=int, default=200_000)
    p.add_argument("--time-budget", type=float, default=None, dest="time_budget_s",
                   help="seconds after which remaining points are recorded as skipped")
    p.add_argument("--out-dir", type=Path, default=FIG_DIR, help="where the JSON, Markdown and figure go")
    p.add_argument("--stem", default="model_bench", help="file name stem of the outputs")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="no timing: re-render the Markdown and figure from an earlier JSON")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def config_from_args(args: argparse.Namespace):
    """The dataclass the sweep runs on, validated (ValueError carries the one-line reason)."""
    import math

    import torch

    from cs336_systems.benchmarking.lm_bench import ModelBenchConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelBenchConfig(
        sizes=args.sizes, contexts=args.contexts, modes=args.modes, precisions=args.precisions,
        compile_modes=args.compile_modes, batch_size=args.batch_size, vocab_size=args.vocab_size,
        warmup=args.warmup, steps=args.steps, device=device, forward_no_grad=args.forward_no_grad,
        memory_snapshot=args.memory_snapshot, snapshot_steps=args.snapshot_steps,
        snapshot_max_entries=args.snapshot_max_entries,
        time_budget_s=math.inf if args.time_budget_s is None else args.time_budget_s,
        out_dir=args.out_dir, stem=args.stem,
    )
    cfg.validate()
    return cfg


def write_reports(results: dict, out_dir: Path, stem: str) -> None:
    from cs336_systems.benchmarking.common import write_outputs
    from cs336_systems.benchmarking.lm_report import figure, markdown

    md = markdown(results)
    write_outputs(out_dir, stem, results, md)
    png = out_dir / f"{stem}.png"
    if figure(results, png):
        print(f"wrote {png}")
    print(md)


def run(args: argparse.Namespace) -> int:
    if args.render is not None:
        if not args.render.is_file():
            raise SystemExit(f"bench-model: no such file: {args.render}")
        write_reports(json.loads(args.render.read_text()), args.out_dir, args.render.stem)
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"bench-model: {e}") from None
    from cs336_systems.benchmarking.lm_bench import run_sweep

    if cfg.memory_snapshot is not None and cfg.device == "cpu":
        print("bench-model: memory snapshots record CUDA allocations; none will be written on cpu")

    partial = cfg.out_dir / f"{cfg.stem}.json"

    def save(results: dict) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(partial) as f:  # a crash mid-sweep keeps the last whole file
            f.write(json.dumps(results, indent=1, default=str))

    results = run_sweep(cfg, progress=not args.no_progress, on_point=save)
    write_reports(results, cfg.out_dir, cfg.stem)
    return 0
