"""`cs336-systems bench-ddp`: DDP variants' step time and hidden communication, memory per rank with AdamW,
ZeRO-1 and FSDP; JSON, Markdown, figure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cs336_systems.benchmarking.common import FIG_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cs336_systems.benchmarking.ddp_bench import MEMORY_SETUPS, VARIANTS

    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="V",
                   help=f"from {VARIANTS} (none: no wrapper, no communication — the baseline)")
    p.add_argument("--bucket-sizes-mb", nargs="+", type=float, default=[1, 10, 100, 1000], metavar="MIB")
    p.add_argument("--size", default=None, help="model size (default: xl with NCCL, tiny with gloo)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast; FSDP then gathers in bf16)")
    p.add_argument("--backend", default=None, help="nccl (default with 2+ GPUs) or gloo")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--comm-iters", type=int, default=3, help="repetitions of the communication-alone timing")
    p.add_argument("--memory", nargs="*", default=list(MEMORY_SETUPS), metavar="SETUP",
                   help=f"memory setups from {MEMORY_SETUPS}; give none to skip")
    p.add_argument("--start-method", default="spawn")
    p.add_argument("--timeout", type=float, default=600.0, dest="timeout_s", help="process-group timeout, s")
    p.add_argument("--out-dir", type=Path, default=FIG_DIR)
    p.add_argument("--stem", default="ddp_bench")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only re-render an earlier JSON")


def write_reports(results: dict, out_dir: Path, stem: str) -> None:
    from cs336_systems.benchmarking.comm_report import ddp_figure, ddp_markdown
    from cs336_systems.benchmarking.common import write_outputs

    md = ddp_markdown(results)
    write_outputs(out_dir, stem, results, md)
    if ddp_figure(results, out_dir / f"{stem}.png"):
        print(f"wrote {out_dir / f'{stem}.png'}")
    print(md)


def run(args: argparse.Namespace) -> int:
    if args.render is not None:
        if not args.render.is_file():
            raise SystemExit(f"bench-ddp: no such file: {args.render}")
        write_reports(json.loads(args.render.read_text()), args.out_dir, args.render.stem)
        return 0
    import torch

    from cs336_systems.benchmarking.ddp_bench import DDPBenchConfig, run_bench

    backend = args.backend or ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
    cfg = DDPBenchConfig(
        variants=args.variants, bucket_sizes_mb=args.bucket_sizes_mb,
        size=args.size or ("xl" if backend == "nccl" else "tiny"), context=args.context,
        batch_size=args.batch_size, vocab_size=args.vocab_size, precision=args.precision, backend=backend,
        world_size=args.world_size, warmup=args.warmup, steps=args.steps, comm_iters=args.comm_iters,
        memory=args.memory, start_method=args.start_method, timeout_s=args.timeout_s, out_dir=args.out_dir,
        stem=args.stem,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"bench-ddp: {e}") from None
    results = run_bench(cfg)
    write_reports(results, cfg.out_dir, cfg.stem)
    return 0 if results["status"] == "ok" else 1
