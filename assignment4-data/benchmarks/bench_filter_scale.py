"""`cs336-data filter` at Common Crawl size: MB/s per worker and peak memory as the input grows.

    uv run python assignment4-data/benchmarks/scale_wet.py --corpus /tmp/scale/corpus_2.1g.txt \
        --out-dir /tmp/scale/wet --gb 1 --shard-mb 125
    nice -n 15 uv run python assignment4-data/benchmarks/bench_filter_scale.py --wet-dir /tmp/scale/wet \
        --sizes 0.25 0.5 1 --workers 2 --out assignment4-data/benchmarks/results_filter_scale.json \
        --fig fig/a4_filter_scale.png

For each size, the first WET files of `--wet-dir` holding that many GB of text are filtered by the real command
(`python -m cs336_data filter ... --no-harmful`, in a child process: language ID with the bundled lid.176.ftz
when no other model is set, minimum length, Gopher, PII masking), with an empty model cache. The parent samples
the RSS of the command and its workers every 50 ms (the peak of the sum; forked workers' shared pages counted
once per process) and reads the CPU seconds of the tree from the reaped child's rusage; the command's own
`report.json` gives documents, per-step counts and MB/s per worker (compressed MB, as stored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += p.memory_info().rss
    return total


def measure(cmd: list[str], env: dict) -> dict:
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(ps))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {err.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 1), "peak_rss_mb": round(peak / 1e6, 1),
            "load_average_1m_at_start": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wet-dir", required=True, help="scale_wet.py output (with shards.json)")
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="GB of text")
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--out", required=True)
    p.add_argument("--fig")
    args = p.parse_args()
    with open(os.path.join(args.wet_dir, "shards.json")) as f:
        shards = json.load(f)["shards"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CS336_")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="filter-scale-") as tmp:
        env["CS336_DATA_CACHE"] = os.path.join(tmp, "empty_cache")
        for gb in args.sizes:
            chosen, text = [], 0
            for s in shards:
                if text >= gb * 1e9 * 0.999:
                    break
                chosen.append(s)
                text += s["text_bytes"]
            for workers in args.workers:
                out = os.path.join(tmp, f"out_{gb}_{workers}")
                cmd = [sys.executable, "-m", "cs336_data", "filter", *[s["path"] for s in chosen], "--out-dir", out,
                       "--no-harmful", "--workers", str(workers), "--no-progress"]
                row = {"gb_text": round(text / 1e9, 3), "files": len(chosen), "workers": workers, **measure(cmd, env)}
                with open(os.path.join(out, "report.json")) as f:
                    summary = json.load(f)["summary"]
                row.update(
                    documents_read=summary["documents_read"], documents_kept=summary["documents_kept"],
                    input_mb=round(summary["input_mb"], 1), text_mb=round(summary["text_mb"], 1),
                    mb_per_s_per_worker=round(summary["mb_per_second_per_worker"], 3),
                    text_mb_per_s_per_worker=round(summary["text_mb"] / row["wall_s"] / workers, 3),
                    text_mb_per_cpu_s=round(summary["text_mb"] / row["cpu_s"], 3),
                    steps={k: {c: v for c, v in d.items() if c in ("seen", "dropped", "modified", "low_score")}
                           for k, d in summary["steps"].items()},
                )
                shutil.rmtree(out)
                rows.append(row)
                print(json.dumps(row), flush=True)
                _write(args.out, rows)
    if args.fig:
        plot(rows, args.fig)


def _write(path: str, rows: list[dict]) -> None:
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".part", "w") as f:
        json.dump({"benchmark": "filter_scale", "machine": machine, "rows": rows}, f, indent=2)
        f.write("\n")
    os.replace(path + ".part", path)


def plot(rows: list[dict], fig_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cs336_basics.cli_support import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for workers in sorted({r["workers"] for r in rows}):
        rs = [r for r in rows if r["workers"] == workers]
        x = [r["gb_text"] for r in rs]
        a.plot(x, [r["text_mb_per_s_per_worker"] for r in rs], "o-", label=f"{workers} worker(s): wall")
        a.plot(x, [r["text_mb_per_cpu_s"] for r in rs], "x--", label=f"{workers} worker(s): per CPU second")
        b.plot(x, [r["peak_rss_mb"] / 1e3 for r in rs], "o-", label=f"{workers} worker(s)")
    a.set(xlabel="WET text (GB)", ylabel="MB of text / s", title="cs336-data filter throughput")
    b.set(xlabel="WET text (GB)", ylabel="peak RSS, process tree (GB)", title="memory", ylim=(0, None))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, fig_path)


if __name__ == "__main__":
    main()
