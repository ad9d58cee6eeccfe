"""Several demonstration runs at once, side by side on one GPU, gathered into one table, JSON and figure.

    python -m cs336_alignment.demo.multi seeds --preset h200 --seeds 0 1 2 --repeat 0 --out-dir runs/seeds
    python -m cs336_alignment.demo.multi sweep --preset h200 --lrs 1e-5 3e-5 1e-4 \\
        --variant lr1e-4-warmup:grpo_lr=1e-4,grpo_warmup_steps=20 --out-dir runs/sweep

    python -m cs336_alignment.demo.multi methods --preset methods --seeds 0 1 2 --out-dir runs/methods --fig-dir fig
    python -m cs336_alignment.demo.multi methods --tiny --out-dir /tmp/methods      # CPU, in one process

`seeds` runs the whole chain once per seed (`--repeat S` runs seed S a second time to show that a seed fixes
the numbers). `sweep` trains one SFT start, then runs GRPO from it once per setting, so the settings differ
in nothing else. Each run is a child process (`python -m cs336_alignment.demo`) with its own folder and
`log.txt`; the small model leaves the GPU mostly idle, so the runs share it well. `methods` trains one SFT start
per seed, then runs every `--methods` entry (grpo, gspo, ppo-rule, ppo-rm) from its seed's start with the same
rollout budget, and writes the comparison of `demo/compare.py`; `--tiny` runs it in this process on the CPU
(the `tiny` preset; `--inline` does that for any preset). `--fig-dir` also copies the
figure there; `report --of seeds|sweep` redraws from finished run folders or from a gathered `a5_*.json`.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from cs336_alignment.demo.config import METHODS, PRESETS, preset
from cs336_basics.cli_support import UserError, atomic_path, atomic_write, run_command, save_figure


def demo_command(preset_name: str, out_dir: str, overrides: list[str], *extra: str) -> list[str]:
    command = [sys.executable, "-m", "cs336_alignment.demo", "--preset", preset_name, "--out-dir", out_dir]
    for item in overrides:
        command += ["--set", item]
    return command + list(extra)


def run_children(jobs: dict[str, list[str]], root: str, max_parallel: int = 0) -> dict[str, int]:
    """Runs the jobs side by side, at most `max_parallel` at a time (0: all at once), each logging to
    `root/<label>/log.txt`; returns exit codes by label."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started, procs, logs = time.perf_counter(), {}, {}
    queue = list(jobs)
    limit = max_parallel or len(queue)

    def launch(label: str) -> None:
        os.makedirs(os.path.join(root, label), exist_ok=True)
        logs[label] = open(os.path.join(root, label, "log.txt"), "w")  # noqa: SIM115 (closed when the child ends)
        procs[label] = subprocess.Popen(jobs[label], stdout=logs[label], stderr=subprocess.STDOUT, env=env)

    first = queue[:limit]
    for label in first:
        launch(label)
    del queue[:limit]
    waiting = f" ({len(queue)} more as these finish)" if queue else ""
    print(f"multi: started {len(first)} runs: {', '.join(first)}{waiting}", flush=True)
    codes: dict[str, int] = {}
    while len(codes) < len(jobs):
        for label, proc in list(procs.items()):
            if label not in codes and proc.poll() is not None:
                codes[label] = proc.returncode
                logs[label].close()
                print(f"multi: {label} finished with exit code {proc.returncode} after "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
                if proc.returncode:
                    print(tail(os.path.join(root, label, "log.txt")), file=sys.stderr, flush=True)
                if queue:
                    launch(queue[0])
                    print(f"multi: started {queue.pop(0)}", flush=True)
        time.sleep(1.0)
    return codes


def tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def load_runs(root: str, labels: list[str]) -> dict[str, dict[str, Any]]:
    runs = {}
    for label in labels:
        path = os.path.join(root, label, "a5_demo_results.json")
        if os.path.isfile(path):
            with open(path) as f:
                runs[label] = json.load(f)
    return runs


def same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two runs agree on everything but wall times and speeds (what a fixed seed must fix)."""
    def strip(results: dict[str, Any]) -> dict[str, Any]:
        keep = {k: results[k] for k in ("heldout", "reward_gain_sampled", "reward_gain_greedy", "grpo_steps_run")}
        keep["curves"] = [{k: v for k, v in r.items() if k != "rollout_tokens_per_s"}
                          for r in results["curves"]["grpo_train"]], results["curves"]["grpo_eval"]
        for stage in keep["heldout"].values():
            if isinstance(stage, dict):
                for summary in stage.values():
                    for key in ("generation_seconds", "generation_tokens_per_s"):
                        summary.pop(key, None)
        return json.loads(json.dumps(keep))
    return strip(a) == strip(b)


def row(label: str, r: dict[str, Any]) -> str:
    held, c = r["heldout"], r["config"]
    s0, s1, g0, g1 = (held["sft"]["sampled"], held["grpo"]["sampled"], held["sft"]["greedy"], held["grpo"]["greedy"])

    def pm(value: float | None, se: float | None) -> str:
        return "–" if value is None else f"{value:.3f} ± {se or 0:.3f}"

    return (f"| {label} | {c['seed']} | {c['grpo_lr']:g} | {c['grpo_warmup_steps']} | "
            f"{pm(s0['reward'], s0.get('reward_se'))} | {pm(s1['reward'], s1.get('reward_se'))} | "
            f"**{r['reward_gain_sampled']:+.3f}** ± {r['reward_gain_sampled_se'] or 0:.3f} | "
            f"{pm(g0['reward'], g0.get('reward_se'))} | {pm(g1['reward'], g1.get('reward_se'))} | "
            f"**{r['reward_gain_greedy']:+.3f}** ± {r['reward_gain_greedy_se'] or 0:.3f} | "
            f"{s0['mean_token_entropy']:.3f} → {s1['mean_token_entropy']:.3f} | "
            f"{s0['response_length']:.1f} → {s1['response_length']:.1f} | "
            f"{r['grpo_steps_run']}{' (guard)' if r.get('stopped_by_guard') else ''} | "
            f"{r['timings_s']['total']:.0f} |")


def markdown(kind: str, runs: dict[str, dict[str, Any]], notes: list[str]) -> str:
    first = next(iter(runs.values()))
    held_n = first["heldout"]["n"]
    lines = [f"# Assignment 5 demo, {kind}: GRPO from the SFT start", "",
             f"Device: {first['device']}; held-out set {held_n} problems per seed; ± is one standard error (paired "
             "for the gains). Sampled = one sample per problem at T=1; greedy = T=0.", "",
             "| run | seed | lr | warm-up | sampled, SFT | sampled, GRPO | gain | greedy, SFT | greedy, GRPO | gain | "
             "entropy (T=1) | length | GRPO steps | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(label, r) for label, r in runs.items()]
    return "\n".join([*lines, "", *notes, ""])


def plot_runs(runs: dict[str, dict[str, Any]], title: str, path: str) -> None:
    """Four panels over GRPO steps, one colour per run: held-out reward (in-loop, T=1) with the start and end
    greedy rewards marked, rollout reward, rollout token entropy, rollout response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (held, roll), (ent, length) = axes
    for i, (label, r) in enumerate(runs.items()):
        color = f"C{i}"
        train, evals = r["curves"]["grpo_train"], r["curves"]["grpo_eval"]
        steps = [t["step"] for t in train]
        last = steps[-1] if steps else 0
        if evals:
            held.plot([e["step"] for e in evals], [e["reward"] for e in evals], "o-", ms=3, color=color, label=label)
        g0, g1 = r["heldout"]["sft"]["greedy"]["reward"], r["heldout"]["grpo"]["greedy"]["reward"]
        held.plot([0, last], [g0, g1], "^--", color=color, alpha=0.55, ms=7)
        roll.plot(steps, [t["reward_mean"] for t in train], color=color, lw=1, label=f"{label}: reward")
        roll.plot(steps, [t["format_reward_mean"] for t in train], color=color, lw=0.8, ls=":", alpha=0.8)
        ent.plot(steps, [t["token_entropy"] for t in train], color=color, lw=1, label=label)
        length.plot(steps, [t["response_length"] for t in train], color=color, lw=1, label=label)
    first = next(iter(runs.values()))
    held.set_title(f"held-out reward: dots T=1 in the loop ({first['config']['n_eval_in_loop']} problems); "
                   f"triangles greedy, start → end ({first['heldout']['n']})", fontsize=9)
    held.set_ylim(-0.02, 1.02)
    roll.set_title("rollout batch: reward (solid), format reward (dotted)", fontsize=9)
    roll.set_ylim(-0.02, 1.02)
    ent.set_title("rollout mean token entropy (nats)", fontsize=9)
    length.set_title("rollout response length (tokens)", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    held.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


NAMES = {"seeds": "a5_seeds", "sweep": "a5_lr_sweep"}


def gather(kind: str, root: str, labels: list[str], repeat: tuple[str, str] | None, fig_dir: str | None,
           runs: dict[str, dict[str, Any]] | None = None) -> int:
    """Writes `a5_<kind>.json`, `.md` and `.png` into `root` (figure also into `fig_dir`); 1 if a run is missing.
    Reads the run folders unless `runs` are given."""
    runs = load_runs(root, labels) if runs is None else runs
    missing = [label for label in labels if label not in runs]
    notes = [f"Missing (failed) runs: {', '.join(missing)}; see their log.txt."] if missing else []
    if repeat and all(label in runs for label in repeat):
        same = same_numbers(runs[repeat[0]], runs[repeat[1]])
        notes.append(f"Reproducibility: `{repeat[1]}` repeats `{repeat[0]}` with the same seed and "
                     f"{'gives exactly the same numbers' if same else 'DIFFERS'} (every reward, entropy, length, "
                     "curve point; wall times aside).")
    if not runs:
        print("multi: no run finished", file=sys.stderr)
        return 1
    name = NAMES[kind]
    plotted = {label: r for label, r in runs.items() if not (repeat and label == repeat[1])}
    first = next(iter(plotted.values()))["config"]
    title = (f"GRPO on the demo task, seeds {', '.join(str(r['config']['seed']) for r in plotted.values())}"
             if kind == "seeds" else f"GRPO learning-rate sweep from one SFT start (seed {first['seed']})")
    plot_runs(plotted, f"{title} — {first['loss_type']}, {first['rollout_batch_size']} rollouts/step", 
              os.path.join(root, f"{name}.png"))
    if fig_dir:
        os.makedirs(fig_dir, exist_ok=True)
        with atomic_path(os.path.join(fig_dir, f"{name}.png")) as tmp:
            shutil.copy(os.path.join(root, f"{name}.png"), tmp)
    text = markdown(kind, runs, notes)
    with atomic_write(os.path.join(root, f"{name}.md")) as f:
        f.write(text)
    with atomic_write(os.path.join(root, f"{name}.json")) as f:
        json.dump({"kind": kind, "notes": notes, "runs": runs}, f, indent=1, default=float)
    print(text)
    return 1 if missing else 0


def run_methods(preset_name: str, overrides: list[str], seeds: list[int], methods: list[str], root: str,
                fig_dir: str | None, inline: bool, max_parallel: int = 0, resume: bool = False) -> int:
    """Per seed one SFT start (`seed<S>/start/start.pt`), then every method from it (`seed<S>/<method>/`), all
    seeds' starts side by side, then all (seed, method) runs side by side (`inline`: in this process, in turn);
    writes the comparison (`demo/compare.py`). 1 if a run failed (the others are still compared). `resume`
    keeps the starts and runs that finished before (a start.pt, an a5_demo_results.json) and runs the rest."""

    def start(s: int) -> str:
        return os.path.join(root, f"seed{s}", "start", "start.pt")

    def folder(s: int, label: str) -> str:
        return os.path.join(root, f"seed{s}", label)

    if inline:
        from cs336_alignment.demo.pipeline import run_demo

        base = preset(preset_name, overrides)
        for s in seeds:
            run_demo(replace(base, seed=s), folder(s, "start"), save_start_to=start(s), start_only=True)
            for m in methods:
                run_demo(replace(base, seed=s, method=m), folder(s, m), start_from=start(s))
    else:
        def finished(s: int, m: str) -> bool:
            return resume and os.path.isfile(os.path.join(folder(s, m), "a5_demo_results.json"))

        kept = [f"seed{s}/start" for s in seeds if resume and os.path.isfile(start(s))]
        kept += [f"seed{s}/{m}" for s in seeds for m in methods if finished(s, m)]
        if kept:
            print(f"multi: --resume keeps {', '.join(kept)}", flush=True)
        print("multi: training the SFT start of each seed", flush=True)
        starts = {f"seed{s}/start": demo_command(preset_name, folder(s, "start"), [*overrides, f"seed={s}"],
                                                 "--save-start", start(s), "--start-only")
                  for s in seeds if f"seed{s}/start" not in kept}
        codes = {label: 0 for label in kept} | run_children(starts, root, max_parallel)
        jobs = {f"seed{s}/{m}": demo_command(preset_name, folder(s, m), [*overrides, f"seed={s}", f"method={m}"],
                                             "--start-from", start(s))
                for s in seeds if not codes[f"seed{s}/start"] for m in methods if not finished(s, m)}
        run_children(jobs, root, max_parallel)
    return compare_methods(root, seeds, methods, fig_dir)


def finished_methods(root: str) -> tuple[list[int], list[str]]:
    """The seeds and methods that have run folders (`seed<S>/<method>/a5_demo_results.json`) under `root`."""
    seeds, methods = set(), set()
    for entry in os.listdir(root):
        match = re.fullmatch(r"seed(\d+)", entry)
        if not match:
            continue
        for m in METHODS:
            if os.path.isfile(os.path.join(root, entry, m, "a5_demo_results.json")):
                seeds.add(int(match.group(1)))
                methods.add(m)
    return sorted(seeds), [m for m in METHODS if m in methods]


def compare_methods(root: str, seeds: list[int], methods: list[str], fig_dir: str | None) -> int:
    """The comparison of the (seed, method) runs under `root`; seeds run in separate jobs (`--seeds 0`, then
    `--seeds 1`, ... into one folder) are compared together by `report --of methods`."""
    from cs336_alignment.demo import compare

    runs = {}
    for s in seeds:
        for m in methods:
            path = os.path.join(root, f"seed{s}", m, "a5_demo_results.json")
            if os.path.isfile(path):
                with open(path) as f:
                    runs[(s, m)] = json.load(f)
    if not runs:
        print("multi: no run finished", file=sys.stderr)
        return 1
    comparison = compare.compare(runs, seeds, methods)
    paths = compare.write(comparison, root, fig_dir)
    print(compare.markdown(comparison))
    print("multi: wrote " + ", ".join(paths.values()), flush=True)
    return 1 if comparison["missing"] else 0


def redraw_methods(root: str, fig_dir: str | None, fail) -> int:
    """Table and figure again from a gathered `a5_methods.json` (e.g. the committed results); the checks and the
    winner are recomputed from its per-seed entries."""
    from cs336_alignment.demo import compare

    path = os.path.join(root, f"{compare.NAME}.json")
    if not os.path.isfile(path):
        return fail(f"{root} has no {compare.NAME}.json")
    with open(path) as f:
        comparison = json.load(f)
    comparison["checks"], comparison["winner"] = compare.checks(comparison), compare.winner(comparison)
    compare.write(comparison, root, fig_dir)
    print(compare.markdown(comparison))
    return 0


def parse_variant(text: str) -> tuple[str, list[str]]:
    label, sep, settings = text.partition(":")
    if not sep or not label or not settings:
        raise UserError(f"bad --variant {text!r}: expected LABEL:key=value[,key=value...]")
    return label, settings.split(",")


def main(argv: list[str] | None = None) -> int:
    """The shared error boundary around `_main` (a damaged results file, an unwritable folder: one line, exit 2)."""
    result = {"code": 0}

    def call() -> None:
        result["code"] = _main(argv)

    return run_command("python -m cs336_alignment.demo.multi", call) or result["code"]


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cs336_alignment.demo.multi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("seeds", "sweep", "methods", "report"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--fig-dir", help="also copy the figure here (e.g. fig/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, help="seeds: run this seed twice (reproducibility check)")
    parser.add_argument("--seed", type=int, default=0, help="sweep: the seed of the shared start")
    parser.add_argument("--lrs", type=float, nargs="*", default=[], help="sweep: GRPO learning rates")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:K=V,...",
                        help="sweep: a further setting (repeatable)")
    parser.add_argument("--of", choices=("seeds", "sweep", "methods"), help="report: which kind of folder to redraw")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods: the RL methods to compare (default: all four)")
    parser.add_argument("--tiny", action="store_true", help="methods: the tiny CPU preset, in this process")
    parser.add_argument("--inline", action="store_true", help="methods: run every stage in this process, in turn")
    parser.add_argument("--max-parallel", type=int, default=8,
                        help="runs at a time (0: all); a run of the h200/methods presets holds about 7 GB of GPU "
                             "memory, so 8 fit an 80 GB card and 12 do not")
    parser.add_argument("--resume", action="store_true",
                        help="methods: keep the starts and runs that finished before, run only the rest")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.inline = "tiny", True

    def fail(message: str) -> int:
        print(f"multi: error: {message}", file=sys.stderr)
        return 2

    try:
        preset(args.preset, args.set)
        variants = [parse_variant(v) for v in args.variant]
        for _label, settings in variants:
            preset(args.preset, args.set + settings)
    except ValueError as e:
        return fail(str(e))
    if not all(math.isfinite(lr) and lr > 0 for lr in args.lrs):  # NaN passed `lr <= 0`: every run then failed
        return fail("--lrs must be positive and finite")
    if min([*args.seeds, args.seed]) < 0:
        return fail("--seeds and --seed must be >= 0")
    if args.max_parallel < 0:
        return fail("--max-parallel must be 0 (all at once) or positive")
    root = args.out_dir
    os.makedirs(root, exist_ok=True)

    if args.kind == "report":
        if not args.of:
            return fail("report needs --of seeds|sweep|methods")
        if args.of == "methods":
            seeds, methods = finished_methods(root)
            if seeds:  # run folders (possibly of several jobs): compare them afresh
                return compare_methods(root, seeds, methods, args.fig_dir)
            return redraw_methods(root, args.fig_dir, fail)
        labels = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "a5_demo_results.json")))
        saved = os.path.join(root, f"{NAMES[args.of]}.json")
        if not labels and os.path.isfile(saved):  # redraw from a gathered file (e.g. the committed results)
            with open(saved) as f:
                runs = json.load(f)["runs"]
            repeat = next(((a, b) for b in runs for a in runs if b == f"{a}-repeat"), None)
            return gather(args.of, root, list(runs), repeat, args.fig_dir, runs)
        if not labels:
            return fail(f"{root} has no finished runs and no {NAMES[args.of]}.json")
        return gather(args.of, root, labels, None, args.fig_dir)

    if args.kind == "methods":
        if len(set(args.seeds)) != len(args.seeds) or len(set(args.methods)) != len(args.methods):
            return fail("--seeds and --methods must be distinct")
        return run_methods(args.preset, args.set, args.seeds, args.methods, root, args.fig_dir, args.inline,
                           args.max_parallel, args.resume)

    if args.kind == "seeds":
        if len(set(args.seeds)) != len(args.seeds):
            return fail("--seeds must be distinct (use --repeat for a repeated seed)")
        jobs = {f"seed{s}": demo_command(args.preset, os.path.join(root, f"seed{s}"), [*args.set, f"seed={s}"])
                for s in args.seeds}
        repeat = None
        if args.repeat is not None:
            if args.repeat not in args.seeds:
                return fail("--repeat must be one of --seeds")
            label = f"seed{args.repeat}-repeat"
            jobs[label] = demo_command(args.preset, os.path.join(root, label), [*args.set, f"seed={args.repeat}"])
            repeat = (f"seed{args.repeat}", label)
        run_children(jobs, root, args.max_parallel)
        return gather("seeds", root, list(jobs), repeat, args.fig_dir)

    settings = [(f"lr{lr:g}", [f"grpo_lr={lr:g}"]) for lr in args.lrs] + variants
    if not settings:
        return fail("sweep needs --lrs and/or --variant")
    if len({label for label, _ in settings}) != len(settings):
        return fail("sweep labels must be distinct")
    shared = [*args.set, f"seed={args.seed}"]
    start = os.path.join(root, "start", "start.pt")
    print("multi: training the shared SFT start", flush=True)
    codes = run_children({"start": demo_command(args.preset, os.path.join(root, "start"), shared,
                                                "--save-start", start, "--start-only")}, root, args.max_parallel)
    if codes["start"]:
        return fail("the shared start failed; see start/log.txt")
    jobs = {label: demo_command(args.preset, os.path.join(root, label), shared + extra, "--start-from", start)
            for label, extra in settings}
    run_children(jobs, root, args.max_parallel)
    return gather("sweep", root, list(jobs), None, args.fig_dir)


if __name__ == "__main__":
    raise SystemExit(main())
