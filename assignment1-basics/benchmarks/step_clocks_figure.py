"""The training step's per-step GPU time beside the GPU's SM clock and board power, on one time axis.

Reads a `train_step_flags.py --trace-steps` report (its rows' `trace`: step durations from CUDA events, the host
time each step was issued, the trace's wall-clock origin) and an `nvidia-smi --query-gpu=timestamp,clocks.sm,...,
power.draw,... --format=csv,nounits -lms N` log taken beside it (`bash .ci/device-runs step-clocks`), and draws
both, so a slow stretch of steps can be read against what the clock did at that moment:

    python assignment1-basics/benchmarks/step_clocks_figure.py \
        --report results/train_step_clocks_h100.json --clocks results/train_step_clocks_nvidia_smi_h100.csv \
        --figure ../fig/train_step_clocks_h100.png
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
from pathlib import Path


def read_clock_log(path: Path) -> list[dict]:
    """nvidia-smi's CSV (header row, `nounits`) as dicts: unix time, SM clock MHz, power W, event reasons."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty clock log")
    header = [h.strip() for h in rows[0]]
    try:
        at = {name: header.index(name) for name in ("timestamp", "clocks.current.sm [MHz]", "power.draw [W]")}
    except ValueError as e:
        raise ValueError(f"{path}: not an nvidia-smi log with timestamp, clocks.sm and power.draw ({e})") from e
    reasons = next((i for i, h in enumerate(header) if h.startswith("clocks_event_reasons")), None)
    samples = []
    for row in rows[1:]:
        if len(row) != len(header):
            continue  # a line cut off when the logger was stopped
        # nvidia-smi prints the host's local time; the device machine runs on UTC
        when = datetime.datetime.strptime(row[at["timestamp"]].strip(), "%Y/%m/%d %H:%M:%S.%f")
        samples.append({"unix": when.replace(tzinfo=datetime.UTC).timestamp(),
                        "sm_mhz": float(row[at["clocks.current.sm [MHz]"]]),
                        "power_w": float(row[at["power.draw [W]"]]),
                        "reasons": row[reasons].strip() if reasons is not None else ""})
    return samples


def step_times(trace: dict, steps_per_window: int) -> list[tuple[float, float]]:
    """(seconds from the trace's origin at which the host issued the step, the step's GPU ms) for each traced step
    after the first. The GPU runs a step at most about one step after its issue: with the launch queue full the
    host issues the next step when the GPU frees room. A window's first step is left out: its duration holds
    the host's sync between windows."""
    issued = trace["issued_s"]
    return [(issued[i + 1], ms) for i, ms in enumerate(trace["step_ms"]) if (i + 1) % steps_per_window]


def clocks_during(samples: list[dict], origin_unix: float, start_s: float, end_s: float) -> list[dict]:
    """The clock samples between start_s and end_s seconds after origin_unix, with `t` on that axis."""
    return [{**s, "t": s["unix"] - origin_unix} for s in samples if start_s <= s["unix"] - origin_unix <= end_s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=True, help="train_step_flags.py JSON with --trace-steps")
    parser.add_argument("--clocks", type=Path, required=True, help="nvidia-smi CSV logged beside it")
    parser.add_argument("--variant", default=None, help="the row to draw (default: the first with a trace)")
    parser.add_argument("--figure", type=Path, required=True)
    args = parser.parse_args()
    for path in (args.report, args.clocks):
        if not path.is_file():
            parser.error(f"no such file: {path}")
    try:
        report = json.loads(args.report.read_text())
    except json.JSONDecodeError as e:
        parser.error(f"{args.report}: not a JSON report ({e})")
    rows = [r for r in report["rows"] if "trace" in r and (args.variant is None or r["variant"] == args.variant)]
    if not rows:
        parser.error(f"{args.report}: no traced row" + (f" named {args.variant!r}" if args.variant else ""))
    row = rows[0]
    if "origin_unix" not in row["trace"]:
        parser.error(f"{args.report}: the trace has no wall-clock origin (made before origin_unix was recorded)")
    steps = step_times(row["trace"], report["steps_per_window"])
    try:
        log = read_clock_log(args.clocks)
    except ValueError as e:
        parser.error(str(e))
    samples = clocks_during(log, row["trace"]["origin_unix"], steps[0][0] - 0.2, steps[-1][0] + 0.2)
    if not samples:
        parser.error("the clock log has no sample inside the traced steps' time span")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_clock) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    ax_step.plot([t for t, _ in steps], [ms for _, ms in steps], ".-", lw=0.8, ms=3)
    ax_step.set_ylabel("step, GPU ms")
    ax_step.set_title(f"{row['variant']}: {report.get('device', '')}, median {row['ms_per_step']:.2f} ms a step")
    ax_step.grid(alpha=0.3)
    ax_clock.plot([s["t"] for s in samples], [s["sm_mhz"] for s in samples], color="tab:red", lw=1)
    ax_clock.set_ylabel("SM clock, MHz", color="tab:red")
    ax_clock.set_xlabel("seconds into the timing (steps at their issue time)")
    ax_clock.grid(alpha=0.3)
    ax_power = ax_clock.twinx()
    ax_power.plot([s["t"] for s in samples], [s["power_w"] for s in samples], color="tab:gray", lw=1)
    ax_power.set_ylabel("board power, W", color="tab:gray")
    reasons = sorted({s["reasons"] for s in samples})
    mean_mhz = statistics.mean(s["sm_mhz"] for s in samples)
    ax_clock.set_title(f"mean {mean_mhz:.0f} MHz; clock event reasons seen: {', '.join(reasons) or 'n/a'}",
                       fontsize=9)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"{len(steps)} steps, {len(samples)} clock samples, mean {mean_mhz:.0f} MHz; wrote {args.figure}")


if __name__ == "__main__":
    main()
