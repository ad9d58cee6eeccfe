"""Tokens/s of `cs336-basics train --parallel none|ddp|fsdp` at world sizes 1 and 2 (issue 21), measured on the
real command: `--parallel none` as a plain process, ddp/fsdp under `torchrun --standalone --nproc_per_node W`.

Each run trains on random token ids for `--steps` steps with `--compile` (on CUDA), logging every
`--log-interval` steps; the tokens/s of a run is the median of its logged windows after the first
`--skip-windows` (which hold compilation and warm-up). The per-GPU batch is fixed (weak scaling): the global
`--batch-size` of a run is per_gpu_batch x W. Reported: tokens/s, step time, the overhead of ddp/fsdp at world
size 1 against `--parallel none`, and the scaling efficiency tokens/s(W) / (W x tokens/s(1)).

    # one GPU (issue 21's <5% overhead check), then the multi-GPU issue's machine with --world-sizes 1 2
    python assignment1-basics/benchmarks/parallel_scaling.py --shapes 17m --out $OUT/parallel_17m.json
    python assignment1-basics/benchmarks/parallel_scaling.py --shapes 125m --out $OUT/parallel_125m.json
    # the whole script on the CPU in about two minutes (gloo, a tiny model, no compile): checks, not numbers
    python assignment1-basics/benchmarks/parallel_scaling.py --quick-cpu --out /tmp/parallel_cpu.json

World sizes above the number of visible GPUs are skipped (and recorded as such).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# The handout's 17M model (tinystories-17m) and a GPT-2-small-sized shape (~125M with embeddings at vocab 32K).
SHAPES = {
    "17m": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344,
                per_gpu_batch=128),
    "125m": dict(vocab_size=32_000, context_length=512, d_model=768, num_layers=12, num_heads=12, d_ff=2048,
                 per_gpu_batch=32),
    "tiny": dict(vocab_size=512, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=192,
                 per_gpu_batch=8),
}


def _gpus() -> tuple[int, str]:
    import torch

    if not torch.cuda.is_available():
        return 0, platform.processor() or "cpu"
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def _tokens(folder: str, vocab_size: int, n: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    paths = []
    for split, count in (("train", n), ("val", max(n // 50, 10_000))):
        path = os.path.join(folder, f"{split}_{vocab_size}.npy")
        if not os.path.exists(path):
            np.save(path, rng.integers(0, vocab_size, count).astype(np.uint16))
        paths.append(path)
    return paths[0], paths[1]


def _command(mode: str, world_size: int, shape: dict, args, data: tuple[str, str], out_dir: str) -> list[str]:
    flags = ["train", "--train-data", data[0], "--val-data", data[1], "--out-dir", out_dir, "--overwrite",
             "--max-steps", str(args.steps), "--log-interval", str(args.log_interval),
             "--eval-interval", str(10 * args.steps), "--eval-batches", "1",
             "--checkpoint-interval", str(10 * args.steps), "--warmup-steps", "10", "--no-progress",
             "--batch-size", str(shape["per_gpu_batch"] * world_size), "--parallel", mode,
             "--device", args.device]
    for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
        flags += ["--" + name.replace("_", "-"), str(shape[name])]
    if args.compile:
        flags.append("--compile")
    if mode == "none":
        return [sys.executable, "-m", "cs336_basics", *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
            "-m", "cs336_basics", *flags]


def _measure(command: list[str], out_dir: str, args) -> dict:
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout_s} s"}
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}", "stderr_tail": result.stderr[-2000:], "wall_s": wall}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    windows = [r["tokens_per_s"] for r in records if r.get("split") == "train"][args.skip_windows:]
    if not windows:
        return {"error": "no timed windows (raise --steps or lower --skip-windows)", "wall_s": wall}
    tokens_per_s = statistics.median(windows)
    train = [r for r in records if r.get("split") == "train"]
    return {"tokens_per_s": tokens_per_s, "windows": windows, "wall_s": wall, "final_loss": train[-1]["loss"],
            "mfu": train[-1].get("mfu")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["17m", "125m"], choices=sorted(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["none", "ddp", "fsdp"], choices=["none", "ddp", "fsdp"])
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--skip-windows", type=int, default=2, help="first logged windows left out (compile)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--timeout-s", type=int, default=900, help="per run")
    parser.add_argument("--quick-cpu", action="store_true", help="tiny model on the CPU (gloo), no compile")
    parser.add_argument("--work-dir", default=None, help="token files and run folders (default: a temp folder)")
    parser.add_argument("--out", required=True, help="JSON results; the figure goes beside it (.png)")
    args = parser.parse_args(argv)
    if args.quick_cpu:
        args.shapes, args.device, args.compile = ["tiny"], "cpu", False
        args.steps, args.log_interval, args.skip_windows = min(args.steps, 30), 5, 1

    import torch

    gpus, device_name = _gpus()
    on_cpu = args.device == "cpu" or gpus == 0
    available = (os.cpu_count() or 1) if on_cpu else gpus
    work = args.work_dir or tempfile.mkdtemp(prefix="parallel_scaling_")
    report = {"device": device_name, "gpus": gpus, "torch": torch.__version__, "python": platform.python_version(),
              "host": platform.node(), "compile": args.compile, "steps": args.steps, "runs": []}
    try:
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            tokens_needed = max(2_000_000, 4 * shape["per_gpu_batch"] * shape["context_length"] * max(args.world_sizes))
            data = _tokens(work, shape["vocab_size"], tokens_needed)
            for world_size in args.world_sizes:
                for mode in args.modes:
                    row = {"shape": shape_name, "mode": mode, "world_size": world_size,
                           "global_batch": shape["per_gpu_batch"] * world_size,
                           "tokens_per_step": shape["per_gpu_batch"] * world_size * shape["context_length"]}
                    if mode == "none" and world_size > 1:
                        continue
                    if world_size > available:
                        row["skipped"] = f"world size {world_size} > {available} available device(s)"
                        report["runs"].append(row)
                        continue
                    out_dir = os.path.join(work, f"{shape_name}_{mode}_{world_size}")
                    command = _command(mode, world_size, shape, args, data, out_dir)
                    row["command"] = " ".join(command[1:])
                    row.update(_measure(command, out_dir, args))
                    if "tokens_per_s" in row:
                        row["step_ms"] = 1e3 * row["tokens_per_step"] / row["tokens_per_s"]
                    print(json.dumps({k: v for k, v in row.items() if k not in ("windows", "command")}), flush=True)
                    report["runs"].append(row)
                    _write(report, args.out)  # after every run: a job cut short keeps what it measured
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    _write(report, args.out)
    _figure(report, os.path.splitext(args.out)[0] + ".png")
    return report


def _write(report: dict, path: str) -> None:
    """The report so far, with its derived ratios, replacing the file atomically."""
    _derive(report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)


def _derive(report: dict) -> None:
    """Overhead against `--parallel none` at world size 1; efficiency against the same mode at world size 1."""
    measured = {(r["shape"], r["mode"], r["world_size"]): r["tokens_per_s"] for r in report["runs"]
                if "tokens_per_s" in r}
    for r in report["runs"]:
        if "tokens_per_s" not in r:
            continue
        base = measured.get((r["shape"], "none", 1))
        if base and r["world_size"] == 1 and r["mode"] != "none":
            r["step_time_overhead_vs_none"] = base / r["tokens_per_s"] - 1
        single = measured.get((r["shape"], r["mode"], 1))
        if single and r["world_size"] > 1:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["world_size"] * single)


def _figure(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cs336_basics.cli_support import save_figure

    shapes = list(dict.fromkeys(r["shape"] for r in report["runs"]))
    fig, axes = plt.subplots(1, max(len(shapes), 1), figsize=(5 * max(len(shapes), 1), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=False):
        rows = [r for r in report["runs"] if r["shape"] == shape and "tokens_per_s" in r]
        labels = [f"{r['mode']}\nW={r['world_size']}" for r in rows]
        ax.bar(range(len(rows)), [r["tokens_per_s"] / 1e3 for r in rows],
               color=["C0" if r["mode"] == "none" else "C1" if r["mode"] == "ddp" else "C2" for r in rows])
        ax.set_xticks(range(len(rows)), labels)
        ax.set_ylabel("k tokens/s")
        ax.set_title(f"{shape}, {report['device']}")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
