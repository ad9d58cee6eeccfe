"""`cs336-systems bench-allreduce`: time all-reduce over sizes, world sizes and backends; JSON, Markdown, figure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cs336_systems.benchmarking.common import FIG_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", nargs="+", default=None, metavar="B",
                   help="gloo (CPU tensors) and/or nccl (one GPU per rank); default gloo, plus nccl with 2+ GPUs")
    p.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4, 6], metavar="N")
    p.add_argument("--sizes-mb", nargs="+", type=float, default=[1, 10, 100, 1000], metavar="MIB",
                   help="float32 tensor sizes in MiB")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--start-method", default="spawn", help="spawn (default; safe with CUDA), fork or forkserver")
    p.add_argument("--timeout", type=float, default=300.0, dest="timeout_s", help="process-group timeout, s")
    p.add_argument("--out-dir", type=Path, default=FIG_DIR)
    p.add_argument("--stem", default="allreduce_bench")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only re-render an earlier JSON")


def write_reports(results: dict, out_dir: Path, stem: str) -> None:
    from cs336_systems.benchmarking.comm_report import allreduce_figure, allreduce_markdown
    from cs336_systems.benchmarking.common import write_outputs

    md = allreduce_markdown(results)
    write_outputs(out_dir, stem, results, md)
    if allreduce_figure(results, out_dir / f"{stem}.png"):
        print(f"wrote {out_dir / f'{stem}.png'}")
    print(md)


def run(args: argparse.Namespace) -> int:
    if args.render is not None:
        if not args.render.is_file():
            raise SystemExit(f"bench-allreduce: no such file: {args.render}")
        write_reports(json.loads(args.render.read_text()), args.out_dir, args.render.stem)
        return 0
    import torch

    from cs336_systems.benchmarking.allreduce import AllReduceConfig, run_sweep

    backends = args.backends or (["gloo", "nccl"] if torch.cuda.device_count() >= 2 else ["gloo"])
    cfg = AllReduceConfig(backends=backends, world_sizes=args.world_sizes, sizes_mb=args.sizes_mb,
                          warmup=args.warmup, iters=args.iters, start_method=args.start_method,
                          timeout_s=args.timeout_s, out_dir=args.out_dir, stem=args.stem)
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"bench-allreduce: {e}") from None
    write_reports(run_sweep(cfg), cfg.out_dir, cfg.stem)
    return 0
