"""Issue 25's acceptance run: the `owt-leaderboard` preset trained twice from the same seed, once with the old
settings (every throughput flag off) and once with the new ones, by the real `cs336-basics train` command;
then both loss curves (train and validation, against step and against wall-clock) in one figure, JSON with
both curves, the largest |Δ loss| over the last 10 % of the steps, tokens/s and MFU of each run, and a table.

The corpus is the project's generated story corpus (`cs336_basics.corpus`, as in `model_family.py` and
`h100_run.sh`): the GPU machines have no network, so OpenWebText is not there. A BPE is trained on it with the
leaderboard's 32 000 as target, but the grammar has only a few hundred distinct words, so the merges run out
near 670 tokens; the model keeps the preset's 32 000-row embedding and LM head, so every step does the
leaderboard's arithmetic (a softmax over 32 000 logits per token, 512-token context), while the data use the
first ~670 ids. The corpus is easy (every model reaches a floor near 0.33), so the curves are compared where
they still move (the Δ panel) as well as at the end.

Both runs use the same batches in the same order (the batch of step i depends on the seed and i only) and the
same initial weights, so their train losses are compared step by step; they differ only by rounding (the bf16
residual stream, bf16 matmuls in another order, the one-pass loss gradient, the fused AdamW kernel), which a long
run amplifies a little.
Runs are sequential (old first, so the new run's compile may reuse some cached Triton kernels: its first
logged wall-clock point is then a little earlier than a cold start; tokens/s excludes the first log window).

One device call, 8-9 minutes on an H100 (prepare ~15 s; each run: ~15 s to start, ~30-60 s to compile, 2000
steps of ~100 ms (old) and ~55 ms (new), 20 evaluations of 5 batches, one final checkpoint):

    PYTHONPATH=assignment1-basics python3 assignment1-basics/benchmarks/leaderboard_curves.py \\
        --json $OUT/leaderboard_curves.json --figure $OUT/leaderboard_curves.png

`--budget-s` (default 550) bounds the whole script: each run gets a `--time-limit-s` from what is left, so
a slow machine still ends with a figure of the common prefix (the JSON records the steps reached). CPU smoke
test (tiny model and corpus, a few steps, seconds):

    PYTHONPATH=assignment1-basics python3 assignment1-basics/benchmarks/leaderboard_curves.py --tiny \\
        --device cpu --out-dir /tmp/lc --json /tmp/lc/curves.json --figure /tmp/lc/curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # assignment1-basics
PRESET = "owt-leaderboard"
# the preset's flags (the fused loss's 2 000-step curve matched the old one on an H100:
# results/leaderboard_curves_fused_h100.json)
DEFAULT_NEW_FLAGS = ("--loss-impl fused --loss-chunk-tokens 32768 --compile-loss --adamw-impl fused --prefetch "
                     "--residual-dtype auto --attention-layout bshd --rope-layout halves")
# the old settings, spelled out so that a later change of a default cannot slip into the "old" run
OLD_FLAGS = ("--loss-impl full --no-compile-loss --adamw-impl ours --no-prefetch --compile-mode default "
             "--residual-dtype param --attention-layout bhsd --rope-layout pairs --value-proj fused")
TINY_MODEL = ["--vocab-size", "512", "--context-length", "32", "--d-model", "32", "--num-layers", "2",
              "--num-heads", "4", "--d-ff", "64", "--batch-size", "4", "--loss-chunk-tokens", "48"]
RUN_OVERHEAD_S = 30.0  # per run, outside the trainer's clock: interpreter + torch import, model build, checkpoint


def prepare_data(data_dir: str, num_stories: int, bpe_vocab: int, workers: int | None) -> dict[str, Any]:
    """The generated corpus, encoded (torch-free, so that this process leaves the GPU to the runs); the text
    goes once encoded (hundreds of MB)."""
    from cs336_basics.corpus import prepare_encoded_corpus

    info = prepare_encoded_corpus(data_dir, num_stories, bpe_vocab, workers, keep_text=False)
    print(f"corpus: {info['train_tokens']:,} train / {info['val_tokens']:,} val tokens, BPE vocabulary "
          f"{info['bpe_vocab']} (asked {bpe_vocab})", flush=True)
    return info


def train_command(args, data: dict[str, Any], out_dir: str, flags: list[str], time_limit_s: float,
                  stop_after: int) -> list[str]:
    """`cs336-basics train --preset owt-leaderboard` with this script's schedule, evaluation and logging."""
    command = [sys.executable, "-m", "cs336_basics", "train", "--preset", PRESET,
               "--train-data", data["train_data"], "--val-data", data["val_data"], "--out-dir", out_dir,
               "--max-steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
               "--eval-interval", str(args.eval_interval), "--eval-batches", str(args.eval_batches),
               "--log-interval", str(args.log_interval), "--checkpoint-interval", str(args.steps),
               "--seed", str(args.seed), "--device", args.device, "--compile" if args.compile else "--no-compile",
               "--time-limit-s", f"{time_limit_s:.0f}", "--overwrite", "--no-progress"]
    if args.tiny:
        command += TINY_MODEL
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if stop_after:
        command += ["--stop-after-steps", str(stop_after)]
    return command + flags  # last: a flag given here wins over the ones above


def run_one(label: str, command: list[str], one_thread: bool = False) -> float:
    """Runs one training to completion (its output streams through); returns its seconds. `one_thread` (--tiny
    on a CPU): one intra-op thread, else the --prefetch thread and OpenMP's spinning workers oversubscribe a
    small CPU (30 tiny steps: 0.4 s alone, 5-18 s with both on 2 cores)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    print(f"\n== {label}: {shlex.join(command[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, env=env, check=True)
    return time.monotonic() - started


def read_run(out_dir: str) -> dict[str, Any]:
    """The curves of a run's metrics.jsonl, its steps reached and its median throughput (the first log window
    holds the compilation and is left out)."""
    from cs336_basics.training.metrics import read_jsonl

    records = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    speeds = [r["tokens_per_s"] for r in train[1:]]
    mfus = [r["mfu"] for r in train[1:] if "mfu" in r]
    return {
        "train_step": [r["step"] for r in train], "train_loss": [r["loss"] for r in train],
        "train_wall_s": [r["wall_s"] for r in train],
        "val_step": [r["step"] for r in val], "val_loss": [r["loss"] for r in val],
        "val_wall_s": [r["wall_s"] for r in val],
        "steps_done": train[-1]["step"] if train else 0,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "first_log_wall_s": train[0]["wall_s"] if train else None,  # ≈ compile time + one log window
        "train_wall_s_total": train[-1]["wall_s"] if train else None,
    }


def max_abs_delta(a: dict[str, Any], b: dict[str, Any], split: str, from_step: int, to_step: int
                  ) -> tuple[float | None, list[int]]:
    """max |a − b| of `split` loss over the steps both logged in [from_step, to_step], and those steps."""
    left = dict(zip(a[f"{split}_step"], a[f"{split}_loss"], strict=True))
    right = dict(zip(b[f"{split}_step"], b[f"{split}_loss"], strict=True))
    steps = sorted(s for s in left.keys() & right.keys() if from_step <= s <= to_step)
    if not steps:
        return None, []
    return max(abs(left[s] - right[s]) for s in steps), steps


def compare(old: dict[str, Any], new: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """The acceptance numbers: the last 10 % of the steps both runs reached (at least the last step)."""
    last = min(old["steps_done"], new["steps_done"])
    first = min(last, math.ceil(0.9 * last))
    train_delta, train_steps = max_abs_delta(old, new, "train", first, last)
    val_delta, val_steps = max_abs_delta(old, new, "val", first, last)
    deltas = [d for d in (train_delta, val_delta) if d is not None]
    return {"from_step": first, "to_step": last, "max_abs_delta_train": train_delta, "train_points": len(train_steps),
            "max_abs_delta_val": val_delta, "val_points": len(val_steps), "tolerance": tolerance,
            "match": bool(deltas) and max(deltas) <= tolerance}


def delta_series(old: dict[str, Any], new: dict[str, Any], split: str) -> tuple[list[int], list[float]]:
    right = dict(zip(new[f"{split}_step"], new[f"{split}_loss"], strict=True))
    pairs = [(s, right[s] - loss) for s, loss in zip(old[f"{split}_step"], old[f"{split}_loss"], strict=True)
             if s in right]
    return [s for s, _ in pairs], [d for _, d in pairs]


def draw(report: dict[str, Any], path: str) -> None:
    """2 × 2: train loss and validation loss against step, both against wall-clock, and new − old per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    from cs336_basics.cli_support import save_figure

    runs = report["runs"]
    styles = {"old": dict(color="tab:blue"), "new": dict(color="tab:orange")}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (train_ax, val_ax), (wall_ax, delta_ax) = axes
    for name, run in runs.items():
        train_ax.plot(run["train_step"], run["train_loss"], lw=0.8, label=name, **styles[name])
        val_ax.plot(run["val_step"], run["val_loss"], marker=".", label=name, **styles[name])
        wall_ax.plot(run["train_wall_s"], run["train_loss"], lw=0.8, label=f"{name} train", **styles[name])
        wall_ax.plot(run["val_wall_s"], run["val_loss"], marker=".", ls="--", label=f"{name} val", **styles[name])
    for split, marker in (("train", None), ("val", ".")):
        steps, deltas = delta_series(runs["old"], runs["new"], split)
        delta_ax.plot(steps, deltas, lw=0.8, marker=marker, label=f"{split}: new − old")
    window = report["last_10pct"]
    tolerance = window["tolerance"]
    delta_ax.axhspan(-tolerance, tolerance, color="0.85", zorder=0, label=f"±{tolerance:g}")
    delta_ax.axvline(window["from_step"], color="0.4", ls=":", lw=1, label="last 10 %")
    train_ax.set(xlabel="step", ylabel="train loss (the step's batch)", yscale="log", title="train loss")
    val_ax.set(xlabel="step", ylabel="validation loss", yscale="log", title="validation loss")
    wall_ax.set(xlabel="wall-clock (s, incl. compile and evaluation)", ylabel="loss", yscale="log",
                title="against wall-clock")
    delta_ax.set(xlabel="step", ylabel="Δ loss", title="new − old, same batch per step")
    for ax in (train_ax, val_ax, wall_ax):  # log scale, plain numbers: the curves span 10.4 down to ~0.3
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    speeds = {name: run["tokens_per_s"] for name, run in runs.items()}
    speed_text = ", ".join(f"{name} {speed:,.0f} tok/s" for name, speed in speeds.items() if speed)
    reused = _reused(report)
    reused = reused + "\n" if reused else ""
    fig.suptitle(f"{PRESET} on the generated corpus ({report['data']['bpe_vocab']}-token BPE, model vocab "
                 f"{report['vocab_size']:,}), {report['steps']} steps × {report['tokens_per_step']:,} tokens, "
                 f"{report['device']}\n{reused}old: {runs['old']['flags']}\nnew: {runs['new']['flags']}\n"
                 f"{speed_text}; "
                 f"max |Δ| over the last 10 %: train {_fmt(window['max_abs_delta_train'])}, val "
                 f"{_fmt(window['max_abs_delta_val'])}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _reused(report: dict[str, Any]) -> str:
    old = report["runs"]["old"]
    if not old.get("reused_from"):
        return ""
    return f"old run from {os.path.basename(old['reused_from'])}, on {old['device']}"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    print("\n| run | flags | steps | final train loss | final val loss | tokens/s | MFU | train wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in report["runs"].items():
        print(f"| {name} | `{run['flags'] or '(defaults)'}` | {run['steps_done']} | "
              f"{_fmt(run['train_loss'][-1] if run['train_loss'] else None)} | "
              f"{_fmt(run['val_loss'][-1] if run['val_loss'] else None)} | {_fmt(run['tokens_per_s'], ',.0f')} | "
              f"{_fmt(run['mfu'], '.1%')} | {_fmt(run['train_wall_s_total'], '.0f')} |")
    if reused := _reused(report):
        print(f"\n{reused}; a speed-up is given only for runs on the same device")
    w = report["last_10pct"]
    print(f"\nsteps {w['from_step']}–{w['to_step']}: max |Δ train loss| {_fmt(w['max_abs_delta_train'])} over "
          f"{w['train_points']} points, max |Δ val loss| {_fmt(w['max_abs_delta_val'])} over {w['val_points']}; "
          f"tolerance {w['tolerance']:g}: {'match' if w['match'] else 'NO MATCH'}; speed-up "
          f"{_fmt(report['speedup'], '.3f')}×")


def device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or "cpu"


DATA_SETTINGS = ("num_stories", "bpe_vocab", "train_tokens", "val_tokens")


def train_config(flags: list[str], tiny: bool):
    """The TrainConfig the train command builds from the preset and `flags` (paths are placeholders)."""
    from cs336_basics.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--preset", PRESET, "--train-data", "-", "--val-data", "-",
                                      "--out-dir", "-", *(TINY_MODEL if tiny else []), *flags])
    return config_from_args(args)


def reused_old_run(path: str, settings: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The old run of an earlier report, if it trained what this script's old run would (`settings`: the
    report's own keys that decide the curve): the same schedule,
    batches, model and corpus, and flags that give the same TrainConfig as OLD_FLAGS (a flag added since, at
    its default, changes nothing). Its device is kept with it: tokens/s across devices are not a speed-up."""
    from cs336_basics.cli_support.errors import UserError

    with open(path) as f:
        report = json.load(f)
    different = [f"{key}: {report.get(key)!r} there, {value!r} here" for key, value in settings.items()
                 if report.get(key) != value]
    different += [f"data {key}: {report['data'].get(key)!r} there, {data.get(key)!r} here" for key in DATA_SETTINGS
                  if report["data"].get(key) != data.get(key)]
    old = report["runs"]["old"]
    if train_config(shlex.split(old["flags"]), settings["tiny"]) != train_config(shlex.split(OLD_FLAGS),
                                                                                 settings["tiny"]):
        different.append(f"old flags: {old['flags']!r} there, {OLD_FLAGS!r} here")
    if different:
        raise UserError(f"--old-from {path}: its old run trained something else ({'; '.join(different)})")
    return {**old, "reused_from": path, "device": report["device"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 2000; --tiny 30)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's 64")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="default: a tenth of --steps (the preset's 1000 would be half of a 2000-step run)")
    parser.add_argument("--evals", type=int, default=20, help="validation points per run")
    parser.add_argument("--eval-batches", type=int, default=5, help="batches of 64 × 512 per evaluation")
    parser.add_argument("--log-interval", type=int, default=None, help="default 10 (--tiny: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-flags", default=DEFAULT_NEW_FLAGS, help="the new settings' train flags")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on (the preset's setting), off with --tiny")
    parser.add_argument("--num-stories", type=int, default=1_000_000, help="generated training stories (≈73 tokens "
                        "each: 1M ≈ one pass of 2000 × 64 × 512)")
    parser.add_argument("--bpe-vocab", type=int, default=32_000, help="BPE target (the corpus runs out near 670)")
    parser.add_argument("--workers", type=int, default=None, help="BPE/encoding processes (default: cores)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="max |Δ loss| over the last 10 %% to match")
    parser.add_argument("--budget-s", type=float, default=550.0,
                        help="seconds for the whole script; the runs get --time-limit-s from it (0: no limit)")
    parser.add_argument("--old-from", default=None, metavar="JSON",
                        help="take the old run from an earlier report of this script (same schedule, corpus and "
                        "old settings, checked) and train only the new one")
    parser.add_argument("--out-dir", default="/tmp/leaderboard_curves", help="corpus and the two run folders")
    parser.add_argument("--json", required=True)
    parser.add_argument("--figure", required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny model and corpus, a few steps (CPU smoke test)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.steps is None:
        args.steps = 30 if args.tiny else 2000
    if args.compile is None:
        args.compile = not args.tiny
    if args.log_interval is None:
        args.log_interval = 1 if args.tiny else 10
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10)
    if args.tiny:
        args.num_stories, args.bpe_vocab, args.budget_s = min(args.num_stories, 300), min(args.bpe_vocab, 300), 0.0
    args.eval_interval = max(1, args.steps // args.evals)

    data = prepare_data(os.path.join(args.out_dir, "data"), args.num_stories, args.bpe_vocab, args.workers)
    data["prepare_s"] = time.monotonic() - started
    flags = {"old": shlex.split(OLD_FLAGS), "new": shlex.split(args.new_flags)}
    config = train_config([*(["--batch-size", str(args.batch_size)] if args.batch_size else [])], args.tiny)
    settings = {"preset": PRESET, "tiny": args.tiny, "compile": args.compile, "steps": args.steps,
                "warmup_steps": args.warmup_steps, "eval_interval": args.eval_interval,
                "eval_batches": args.eval_batches, "seed": args.seed, "batch_size": config.batch_size,
                "context_length": config.context_length, "vocab_size": config.vocab_size}
    runs: dict[str, dict[str, Any]] = {}
    stop_after = 0
    if args.old_from:
        runs["old"] = reused_old_run(args.old_from, settings, data)
        print(f"old run: {args.old_from} ({runs['old']['device']}, {runs['old']['steps_done']} steps)", flush=True)
        stop_after = runs["old"]["steps_done"] if runs["old"]["steps_done"] < args.steps else 0
    for name, share in (("old", 0.56), ("new", 1.0)):  # the old step is the slower one (≈ 1.3×, predicted)
        if name in runs:
            continue
        limit = 0.0
        if args.budget_s:
            left = args.budget_s - (time.monotonic() - started)
            limit = max(60.0, left * share - RUN_OVERHEAD_S)
        out_dir = os.path.join(args.out_dir, name)
        seconds = run_one(name, train_command(args, data, out_dir, flags[name], limit, stop_after),
                          one_thread=args.tiny)
        runs[name] = {"flags": " ".join(flags[name]), "time_limit_s": limit, "run_s": seconds, **read_run(out_dir)}
        if runs[name]["steps_done"] < args.steps and not stop_after:  # out of time: compare the same prefix
            stop_after = runs[name]["steps_done"]
            print(f"{name} reached step {stop_after} of {args.steps} within its time limit", flush=True)

    old, new = runs["old"], runs["new"]
    device = device_name(args.device)
    new["device"] = device
    same_device = old.get("device", device) == device
    report = {
        **settings, "device": device, "data": data, "runs": runs, "last_10pct": compare(old, new, args.tolerance),
        "speedup": new["tokens_per_s"] / old["tokens_per_s"]
        if old["tokens_per_s"] and new["tokens_per_s"] and same_device else None,
        "python": platform.python_version(), "budget_s": args.budget_s, "old_from": args.old_from,
    }
    report["tokens_per_step"] = report["batch_size"] * report["context_length"]
    report["total_s"] = time.monotonic() - started
    for path in (args.json, args.figure):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    draw(report, args.figure)
    print_table(report)
    print(f"wrote {args.json} and {args.figure} in {report['total_s']:.0f} s", file=sys.stderr)
    return report


if __name__ == "__main__":
    from cs336_basics.cli_support.errors import UserError

    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
