"""`cs336-scaling` (or `python -m cs336_scaling`): isoFLOPs fits, the local API server, the study, real runs.

Heavy or optional imports (fastapi, uvicorn, torch, scipy, matplotlib) happen inside the subcommands, so the
real-trainer subcommands run on a machine with only torch/numpy/scipy/matplotlib.
"""

import argparse
import json
import math
import os
import socket
from dataclasses import dataclass

from cs336_basics.cli_support import (
    UserError,
    atomic_write,
    bounded,
    check_output,
    check_ranges,
    read_jsonl_tolerant,
    reading,
    refuse_overwriting_inputs,
    run_command,
)
from cs336_scaling.api_spec import DEFAULT_BUDGET, APIError, RunConfig

PROG = "cs336-scaling"


@dataclass
class ServeOptions:
    """`serve`'s numbers, checked before anything starts (port 99999 was an OverflowError deep in asyncio)."""

    port: int = bounded(8000, ge=0, le=65535)
    budget: float = bounded(DEFAULT_BUDGET, gt=0)
    noise: float = bounded(0.01, ge=0)

    def __post_init__(self):
        check_ranges(self)


@dataclass
class ProfileOptions:
    time_limit_s: float = bounded(0.0, ge=0)  # 0: no limit

    def __post_init__(self):
        check_ranges(self)


@dataclass
class MakeTokensOptions:
    vocab_size: int = bounded(1024, ge=257, le=65536)  # 256 bytes + <|endoftext|>; ids are stored as uint16
    stories: int = bounded(100_000, ge=1)

    def __post_init__(self):
        check_ranges(self)


def positive(flag: str, values: list[float]) -> list[float]:
    """Each value of a list flag finite and > 0 (a FLOP count or compute budget), or a one-line error."""
    for value in values:
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be > 0, got {value}")
    return values


def flop_counts(flag: str, values: list[float]) -> list[int]:
    """FLOP counts as the integers a run is configured with: each finite and >= 1 (0.5 would become 0)."""
    for value in values:
        if not (math.isfinite(value) and value >= 1):
            raise UserError(f"{flag} must be >= 1, got {value}")
    return [int(value) for value in values]


def check_outputs(files: list[tuple[str, str | None]] = (), folders: list[tuple[str, str]] = ()) -> None:
    """(flag, path) outputs refused before any work rather than when written at the end (after the fit, the
    study or the tokenizer's training): a folder where a file goes, a file where a folder must be created."""
    for flag, folder in folders:
        check_output(folder, flag, folder=True)
    for flag, path in files:
        if path is not None:
            check_output(path, flag)


def figure_paths(prefix: str, names: tuple[str, ...]) -> list[str]:
    return [f"{prefix}_{name}.png" for name in names]


def cmd_isoflops(args) -> dict:
    import numpy as np

    from cs336_scaling.isoflops import fit_isoflops, load_runs, plot_law, plot_profiles

    positive("--predict", args.predict)
    prefix = os.path.join(args.out_dir, args.prefix)
    n_path, d_path, profiles_path = figure_paths(prefix, ("n_opt", "d_opt", "profiles"))
    refuse_overwriting_inputs([n_path, d_path, profiles_path] + ([args.json] if args.json else []), [args.data])
    check_outputs([("--json", args.json), *(("--prefix", p) for p in (n_path, d_path, profiles_path))],
                  [("--out-dir", args.out_dir)])
    runs = load_runs(args.data)
    if len({r.compute_budget for r in runs}) < 2:
        raise UserError(f"{args.data}: the fits need runs at two compute budgets or more")
    fit = fit_isoflops(runs, args.method)
    figures = [plot_law(fit, "n", n_path), plot_law(fit, "d", d_path), plot_profiles(runs, profiles_path)]
    print(f"{len(runs)} runs, {len(fit.optima)} budgets; per-budget optimum by {args.method!r}")
    print(f"{'C':>10} {'N_opt':>12} {'D_opt':>12} {'loss':>8}")
    for o in fit.optima:
        print(f"{o.compute_budget:>10.1e} {o.n_opt:>12.4g} {o.d_opt:>12.4g} {o.loss:>8.4f}")
    print(f"N_opt = {fit.n_law.k:.4g}·C^{fit.n_law.exponent:.4f} (R²={fit.n_law.r2:.4f})")
    print(f"D_opt = {fit.d_law.k:.4g}·C^{fit.d_law.exponent:.4f} (R²={fit.d_law.r2:.4f})")
    summary = {"a": fit.n_law.exponent, "b": fit.d_law.exponent, "k_n": fit.n_law.k, "k_d": fit.d_law.k,
               "predictions": [fit.predict(c) for c in args.predict], "figures": figures}
    for p in summary["predictions"]:
        print(f"C={p['compute']:.0e}: N_opt ≈ {p['n_opt']:.4g} parameters, D_opt ≈ {p['d_opt']:.4g} tokens")
    if args.approach3:
        from cs336_scaling.parametric import fit_parametric

        n = np.array([r.parameters for r in runs])
        law, objective = fit_parametric(n, np.array([r.compute_budget for r in runs]) / (6 * n),
                                        np.array([r.final_loss for r in runs]))
        summary["approach3"] = {**law.to_dict(), "a": law.a, "huber": objective,
                                "predictions": [{"compute": c, "n_opt": float(law.n_opt(c)),
                                                 "d_opt": float(law.d_opt(c))} for c in args.predict]}
        print(f"approach 3: E={law.E:.3f} A={law.A:.4g} B={law.B:.4g} α={law.alpha:.3f} β={law.beta:.3f} "
              f"→ a={law.a:.4f}")
        for p in summary["approach3"]["predictions"]:
            print(f"  C={p['compute']:.0e}: N_opt ≈ {p['n_opt']:.4g}, D_opt ≈ {p['d_opt']:.4g}")
    if args.json:
        with atomic_write(args.json, encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def _real_trainer(args):
    from cs336_scaling.tokens import check_tokens

    if not args.tokens:
        raise UserError(f"{args.command} needs --tokens (a 1-D token file, e.g. from make-tokens)")
    check_tokens(args.tokens, args.vocab_size, args.context_length)  # before torch's import: a bad file fails fast
    from cs336_scaling.trainer import RealTrainer

    return RealTrainer(args.tokens, args.vocab_size, args.context_length, args.device, args.eval_batches,
                       args.max_steps, args.seed, args.compile, args.log_every)


def cmd_serve(args) -> None:
    from cs336_scaling.server import RunStore, TrainingService, create_app
    from cs336_scaling.surrogate import SurrogateLaw

    ServeOptions(args.port, args.budget, args.noise)
    keys = list(args.api_key) + [k for k in os.environ.get("CS336_SCALING_API_KEYS", "").split(",") if k]
    if not keys:
        raise UserError("the server needs at least one API key (--api-key or $CS336_SCALING_API_KEYS)")
    if any(not key.strip() for key in keys):
        raise UserError("--api-key: API keys must not be empty or blank (an empty one lets in requests without a key)")
    check_outputs([("--db", args.db)])
    if args.trainer == "surrogate":
        trainer = SurrogateLaw(seed=args.seed, noise=args.noise).loss
    else:
        trainer = _real_trainer(args)  # checks the token file now, not at the first query
    check_can_listen(args.host, args.port)
    service = TrainingService(trainer, keys, RunStore(args.db), args.budget, args.trainer)
    import uvicorn  # only once every check has passed: a refused start stays quick

    print(f"serving {args.trainer} trainer on http://{args.host}:{args.port} (docs at /docs), {len(keys)} key(s)")
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")


def check_can_listen(host: str, port: int) -> None:
    """A taken port or an unknown host as one line before startup (uvicorn would log it and exit 1)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind((host, port))
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def cmd_study(args) -> dict:
    from contextlib import nullcontext

    from cs336_scaling.client import CACHE_SCHEMA, TrainingAPIClient, open_database
    from cs336_scaling.study import Study, StudyConfig, surrogate_truth, write_report
    from cs336_scaling.surrogate import SurrogateLaw

    config = StudyConfig(target_flops=args.target, budget=args.budget, out_dir=args.out_dir, prefix=args.prefix,
                         seed=args.seed)
    if args.url and not args.api_key:
        raise UserError("--url needs --api-key")
    outputs = [args.report, *figure_paths(os.path.join(args.out_dir, args.prefix), ("profiles", "n_opt"))]
    refuse_overwriting_inputs(outputs + ([args.json] if args.json else []),
                              [args.cache] if args.cache != ":memory:" else [])
    check_outputs([("--report", args.report), ("--json", args.json),
                   *([("--cache", args.cache)] if args.cache != ":memory:" else []),
                   *(("--prefix", p) for p in outputs[1:])], [("--out-dir", args.out_dir)])
    if args.cache != ":memory:":  # before the local server starts: a bad cache is refused at once
        open_database(args.cache, CACHE_SCHEMA, "--cache").close()
    law = None
    if args.url:
        context, url, key = nullcontext(), args.url, args.api_key
    else:
        from cs336_scaling.server import BackgroundServer, RunStore, TrainingService

        law, key = SurrogateLaw(seed=args.seed, noise=args.noise), "study-key"
        context = BackgroundServer(TrainingService(law.loss, [key], RunStore(":memory:"), args.budget))
    with context as server:
        url = url if args.url else server.url
        client = TrainingAPIClient(url, key, args.budget, args.cache)
        result = Study(client, config).run()
        result["requests_sent"] = client.requests_sent
    truth = surrogate_truth(law, result, args.target) if law else None
    result["truth"] = truth
    report = write_report(result, args.report, truth)
    p = result["prediction"]
    print(f"{len(result['queries'])} queries, {result['flops_used']:.3g} FLOPs, {result['seconds']:.1f} s")
    print(f"predicted at {args.target:.0e}: N={p['n_opt_config']:.4g} (d_model={p['d_model']}, "
          f"layers={p['num_layers']}, heads={p['num_heads']}), batch {p['batch_size']}, lr {p['learning_rate']:.3g},"
          f" loss {p['loss']:.4f}")
    if truth:
        print(f"surrogate truth: N={truth['n_opt']:.4g}, loss {truth['loss']:.4f} → size error "
              f"{100 * truth['n_error']:+.1f} %, loss error {truth['loss_error']:+.4f}")
    print(f"wrote {report}")
    if args.json:
        with atomic_write(args.json, encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
    return result


def cmd_train(args) -> dict:
    (train_flops,) = flop_counts("--train-flops", [args.train_flops])
    run = RunConfig(args.d_model, args.num_layers, args.num_heads, args.batch_size, args.learning_rate,
                    train_flops)
    result = {**run.to_dict(), **_real_trainer(args).train(run)}
    print(json.dumps(result))
    return result


def cmd_profile(args) -> dict:
    """A real isoFLOP grid: every budget × every shape, appended to a JSONL file (rerunning skips done runs)."""
    import time

    from cs336_scaling.isoflops import Run, fit_isoflops, plot_law, plot_profiles

    ProfileOptions(args.time_limit_s)
    budgets = flop_counts("--budgets", args.budgets)
    shapes = [parse_shape(shape) for shape in args.shapes]
    figures = figure_paths(args.figure_prefix, ("profiles", "n_opt"))
    refuse_overwriting_inputs([args.results, *figures], [args.tokens] if args.tokens else [])
    check_outputs([("--results", args.results), *(("--figure-prefix", f) for f in figures)])
    trainer = _real_trainer(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)  # before a run, not after it
    started = time.perf_counter()
    done = load_profile(args.results)
    for flops in budgets:
        for d_model, layers, heads in shapes:
            run = RunConfig(d_model, layers, heads, args.batch_size, args.learning_rate, flops)
            if (d_model, layers, flops) in done:
                continue
            if args.time_limit_s and time.perf_counter() - started > args.time_limit_s:
                print("time limit reached; rerun with the same --results to continue", flush=True)
                break
            row = {**run.to_dict(), "n": run.non_embedding_params, **trainer.train(run)}
            print(json.dumps(row), flush=True)
            done[(d_model, layers, flops)] = row
            with open(args.results, "a") as f:  # one whole line per finished run: resumable
                f.write(json.dumps(row) + "\n")
    runs = [Run(r["n"], r["train_flops"], r["loss"]) for r in done.values()]
    if runs:
        plot_profiles(runs, figures[0], "Real trainer: isoFLOP profiles")
    if len({r.compute_budget for r in runs}) >= 2:
        fit = fit_isoflops(runs, "quadratic")
        plot_law(fit, "n", figures[1], title="Real trainer: N_opt vs compute")
        print(f"N_opt ∝ C^{fit.n_law.exponent:.3f}, D_opt ∝ C^{fit.d_law.exponent:.3f}")
    return {"runs": len(runs)}


def parse_shape(shape: str) -> tuple[int, int, int]:
    """`128x2x2` → (d_model, layers, heads), checked like any other configuration."""
    try:
        d_model, layers, heads = (int(x) for x in shape.lower().split("x"))
    except ValueError:
        raise UserError(f"--shapes: expected d_model x layers x heads such as 128x2x2, got {shape!r}") from None
    RunConfig(d_model, layers, heads, 1, 1e-3, 1)  # ranges, divisibility
    return d_model, layers, heads


def load_profile(path: str) -> dict:
    """Finished runs of an earlier `profile` (a half-written last line dropped with a warning, and the file
    rewritten without it so the next append starts on a fresh line)."""
    if not os.path.exists(path):
        return {}
    with reading(path):
        rows = read_jsonl_tolerant(path)
    done = {}
    for number, row in enumerate(rows, start=1):
        try:
            done[(row["d_model"], row["num_layers"], row["train_flops"])] = row
            float(row["n"]), float(row["loss"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: row {number} is not a profile run (d_model, num_layers, train_flops, n, "
                            "loss)") from None
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        with atomic_write(path, encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return done


def cmd_make_tokens(args) -> dict:
    """Generated stories → BPE (cs336_basics) → uint16 token file, for the real trainer where no corpus exists."""
    import time

    import numpy as np

    from cs336_basics.corpus import write_corpus
    from cs336_basics.tokenizer import Tokenizer, train_bpe

    MakeTokensOptions(args.vocab_size, args.stories)
    started = time.perf_counter()
    text = os.path.join(args.work_dir, "stories.txt")
    refuse_overwriting_inputs([args.out], [text])
    check_outputs([("--out", args.out)], [("--work-dir", args.work_dir)])
    os.makedirs(args.work_dir, exist_ok=True)
    write_corpus(text, args.stories, seed=args.seed)
    vocab, merges = train_bpe(text, args.vocab_size, ["<|endoftext|>"])
    tokenizer = Tokenizer(vocab, merges, ["<|endoftext|>"])
    with open(text) as f:  # single process: cs336_basics' parallel encoder needs tqdm, absent on bare machines
        ids = np.fromiter(tokenizer.encode_iterable(f), dtype=np.uint16)
    with atomic_write(args.out, "wb") as f:  # a file object: np.save would append .npy to a path
        np.save(f, ids)
    count = len(ids)
    print(f"{count:,} tokens, vocab {len(vocab)} → {args.out} ({time.perf_counter() - started:.0f} s)")
    return {"tokens": count, "vocab_size": len(vocab)}


def _add_trainer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", help="1-D token file (.npy or raw uint16)")
    p.add_argument("--vocab-size", type=int, default=32_000)
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=None, help="cap for smoke tests (breaks FLOP accounting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--log-every", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cs336-scaling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("isoflops", help="Chinchilla approach 2 (and optionally 3) on an isoflops_curves.json")
    p.add_argument("--data", required=True)
    p.add_argument("--method", choices=["min", "quadratic"], default="min")
    p.add_argument("--predict", type=float, nargs="+", default=[1e23, 1e24])
    p.add_argument("--out-dir", default="runs/a3_isoflops", help="figures go here (fig/ holds the committed ones)")
    p.add_argument("--prefix", default="a3_isoflops")
    p.add_argument("--approach3", action="store_true")
    p.add_argument("--json")
    p.set_defaults(func=cmd_isoflops)

    p = sub.add_parser("serve", help="the local training API (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default="runs/a3_api.sqlite")
    p.add_argument("--api-key", action="append", default=[], help="repeatable; also $CS336_SCALING_API_KEYS")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    p.add_argument("--trainer", choices=["surrogate", "real"], default="surrogate")
    p.add_argument("--noise", type=float, default=0.01)
    _add_trainer_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("study", help="the budgeted study (against a local surrogate server unless --url)")
    p.add_argument("--url")
    p.add_argument("--api-key")
    p.add_argument("--cache", default=":memory:", help="SQLite cache of answers (a path makes re-runs free)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    p.add_argument("--target", "--target-flops", dest="target", type=float, default=1e19)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--out-dir", default="runs/a3_study", help="figures go here (fig/ holds the committed ones)")
    p.add_argument("--prefix", default="a3_study")
    p.add_argument("--report", default="runs/a3_study/STUDY.md",
                   help="the write-up (assignment3-scaling/STUDY.md is the committed one)")
    p.add_argument("--json")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("train", help="one real training run for a query's FLOPs")
    for name, kind, default in (("d-model", int, 128), ("num-layers", int, 2), ("num-heads", int, 2),
                                ("batch-size", int, 128), ("learning-rate", float, 1e-3), ("train-flops", float, 1e13)):
        p.add_argument(f"--{name}", type=kind, default=default)
    _add_trainer_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("profile", help="real isoFLOP profiles: budgets × shapes (d_model x layers x heads)")
    p.add_argument("--budgets", type=float, nargs="+", required=True)
    p.add_argument("--shapes", nargs="+", required=True, help="e.g. 128x2x2 192x3x3 256x4x4 384x6x6")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--results", default="runs/a3_real_profile.jsonl")
    p.add_argument("--figure-prefix", default="runs/a3_real", help="fig/a3_real holds the committed figures")
    p.add_argument("--time-limit-s", type=float, default=0, help="start no new run after this (resume later)")
    _add_trainer_flags(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("make-tokens", help="generated stories → BPE → token file (offline data for the trainer)")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--stories", type=int, default=100_000)
    p.add_argument("--work-dir", default="runs/a3_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tokens)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The error boundary: expected failures (bad values, files, API refusals) print one line and exit 2."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: args.func(args), expected=(APIError,))

