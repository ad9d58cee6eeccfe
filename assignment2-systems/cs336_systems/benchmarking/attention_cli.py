"""`cs336-systems bench-attention`: run the attention benchmark and write JSON, Markdown and a figure."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cs336_basics.cli_support import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[3]
FIG_DIR = REPO_ROOT / "fig"
RESULTS_DIR = REPO_ROOT / "assignment2-systems" / "benchmarks" / "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cs336_systems.benchmarking.attention import ALL_IMPLS, GRID_IMPLS

    p.add_argument("--grid", choices=["leaderboard", "quick", "full"], default="quick",
                   help="shapes to sweep after the leaderboard shape (leaderboard: that shape alone)")
    p.add_argument("--quick", action="store_const", const="quick", dest="grid", help="same as --grid quick")
    p.add_argument("--impls", nargs="+", default=GRID_IMPLS, choices=ALL_IMPLS, help="implementations in the grid")
    p.add_argument("--leaderboard-impls", nargs="+", default=ALL_IMPLS, choices=ALL_IMPLS)
    p.add_argument("--no-leaderboard", action="store_true", help="skip the leaderboard shape")
    p.add_argument("--no-autotune", action="store_true",
                   help="our Triton kernels use the first config of each list (no tuning: faster sweeps)")
    p.add_argument("--course-harness", action="store_true",
                   help="also time the course's torch.compile + o.sum().backward() harness (compiles: slow)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (grid)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (grid)")
    p.add_argument("--leaderboard-rep", type=int, default=1000, help="do_bench repetition time, ms (leaderboard)")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds after which remaining grid points are recorded as skipped")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="write every output here instead of fig/ and assignment2-systems/benchmarks/results/")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="no timing: render the Markdown table and figure from an earlier JSON")


def _paths(args: argparse.Namespace, stem: str) -> dict[str, Path]:
    fig_dir = args.out_dir or FIG_DIR
    res_dir = args.out_dir or RESULTS_DIR
    return {"json": res_dir / f"{stem}.json", "fig_json": fig_dir / f"{stem}.json",
            "md": fig_dir / f"{stem}.md", "png": fig_dir / f"{stem}.png", "ratio_png": fig_dir / f"{stem}_ratio.png"}


def _write_reports(results: dict, paths: dict[str, Path]) -> None:
    from cs336_systems.benchmarking.attention_report import figure, markdown, ratio_figure

    paths["md"].parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(paths["md"]) as f:
        f.write(markdown(results))
    for draw, key in ((figure, "png"), (ratio_figure, "ratio_png")):
        if draw(results, paths[key]):
            print(f"wrote {paths[key]}")
    print(f"wrote {paths['md']}")


def run(args: argparse.Namespace) -> int:
    if args.render is not None:
        results = json.loads(args.render.read_text())
        _write_reports(results, _paths(args, args.render.stem))
        return 0

    import torch

    from cs336_systems.benchmarking import attention as bench

    if not torch.cuda.is_available():
        raise SystemExit("bench-attention needs a CUDA GPU (use --render to draw tables from a JSON)")
    deadline = time.monotonic() + args.time_budget
    if args.no_autotune:
        from cs336_systems.flash_attention import triton_impl

        triton_impl.set_autotune(False)
    results: dict = {"env": bench.environment(), "grid_name": args.grid, "autotune": not args.no_autotune,
                     "do_bench_ms": {"warmup": args.warmup, "rep": args.rep}}
    if not args.no_leaderboard:
        results["leaderboard"] = bench.run_leaderboard(
            args.leaderboard_impls, warmup=100, rep=args.leaderboard_rep, course_harness=args.course_harness
        )
    if args.grid != "leaderboard":
        results["grid"] = bench.run_grid(args.grid, args.impls, args.warmup, args.rep, deadline)
    results["autotune_choices"] = bench.autotune_choices()

    paths = _paths(args, f"fa2_{args.grid}")
    for key in ("json", "fig_json"):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(paths[key]) as f:
            f.write(json.dumps(results, indent=1))
        print(f"wrote {paths[key]}")
    _write_reports(results, paths)
    if "leaderboard" in results:
        from cs336_systems.benchmarking.attention_report import markdown

        print(markdown({"env": results["env"], "leaderboard": results["leaderboard"]}))
    return 0
