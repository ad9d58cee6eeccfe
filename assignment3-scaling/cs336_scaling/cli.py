"""`cs336-scaling` (or `python -m cs336_scaling`): isoFLOPs fits, the local API server, the study, real runs.

Heavy or optional imports (fastapi, uvicorn, torch, scipy, matplotlib) happen inside the subcommands, so the
real-trainer subcommands run on a machine with only torch/numpy/scipy/matplotlib.
"""

import argparse
import json
import os
import sys

from cs336_scaling.api_spec import DEFAULT_BUDGET, RunConfig


def cmd_isoflops(args) -> dict:
    import numpy as np

    from cs336_scaling.isoflops import fit_isoflops, load_runs, plot_law, plot_profiles
    from cs336_scaling.parametric import fit_parametric

    runs = load_runs(args.data)
    fit = fit_isoflops(runs, args.method)
    os.makedirs(args.out_dir, exist_ok=True)
    figures = [plot_law(fit, "n", os.path.join(args.out_dir, f"{args.prefix}_n_opt.png")),
               plot_law(fit, "d", os.path.join(args.out_dir, f"{args.prefix}_d_opt.png")),
               plot_profiles(runs, os.path.join(args.out_dir, f"{args.prefix}_profiles.png"))]
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
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _real_trainer(args):
    from cs336_scaling.trainer import RealTrainer

    return RealTrainer(args.tokens, args.vocab_size, args.context_length, args.device, args.eval_batches,
                       args.max_steps, args.seed, args.compile, args.log_every)


def cmd_serve(args) -> None:
    import uvicorn

    from cs336_scaling.server import RunStore, TrainingService, create_app
    from cs336_scaling.surrogate import SurrogateLaw

    keys = list(args.api_key) + [k for k in os.environ.get("CS336_SCALING_API_KEYS", "").split(",") if k]
    if args.trainer == "surrogate":
        trainer = SurrogateLaw(seed=args.seed, noise=args.noise).loss
    else:
        if not args.tokens:
            raise SystemExit("--trainer real needs --tokens and --vocab-size")
        trainer = _real_trainer(args)
    service = TrainingService(trainer, keys, RunStore(args.db), args.budget, args.trainer)
    print(f"serving {args.trainer} trainer on http://{args.host}:{args.port} (docs at /docs), {len(keys)} key(s)")
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")


def cmd_study(args) -> dict:
    from contextlib import nullcontext

    from cs336_scaling.client import TrainingAPIClient
    from cs336_scaling.study import Study, StudyConfig, surrogate_truth, write_report
    from cs336_scaling.surrogate import SurrogateLaw

    config = StudyConfig(target_flops=args.target, budget=args.budget, out_dir=args.out_dir, prefix=args.prefix,
                         seed=args.seed)
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
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


def cmd_train(args) -> dict:
    run = RunConfig(args.d_model, args.num_layers, args.num_heads, args.batch_size, args.learning_rate,
                    int(args.train_flops))
    result = {**run.to_dict(), **_real_trainer(args).train(run)}
    print(json.dumps(result))
    return result


def cmd_profile(args) -> dict:
    """A real isoFLOP grid: every budget × every shape, appended to a JSONL file (rerunning skips done runs)."""
    import time

    from cs336_scaling.isoflops import Run, fit_isoflops, plot_law, plot_profiles

    trainer = _real_trainer(args)
    started = time.perf_counter()
    done = {}
    if os.path.exists(args.results):
        with open(args.results) as f:
            for line in f:
                row = json.loads(line)
                done[(row["d_model"], row["num_layers"], row["train_flops"])] = row
    for flops in args.budgets:
        for shape in args.shapes:
            d_model, layers, heads = (int(x) for x in shape.split("x"))
            run = RunConfig(d_model, layers, heads, args.batch_size, args.learning_rate, int(flops))
            if (d_model, layers, int(flops)) in done:
                continue
            if args.time_limit_s and time.perf_counter() - started > args.time_limit_s:
                print("time limit reached; rerun with the same --results to continue", flush=True)
                break
            row = {**run.to_dict(), "n": run.non_embedding_params, **trainer.train(run)}
            print(json.dumps(row), flush=True)
            done[(d_model, layers, int(flops))] = row
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
    runs = [Run(r["n"], r["train_flops"], r["loss"]) for r in done.values()]
    plot_profiles(runs, f"{args.figure_prefix}_profiles.png", "Real trainer: isoFLOP profiles")
    if len({r.compute_budget for r in runs}) >= 2:
        fit = fit_isoflops(runs, "quadratic")
        plot_law(fit, "n", f"{args.figure_prefix}_n_opt.png", title="Real trainer: N_opt vs compute")
        print(f"N_opt ∝ C^{fit.n_law.exponent:.3f}, D_opt ∝ C^{fit.d_law.exponent:.3f}")
    return {"runs": len(runs)}


def cmd_make_tokens(args) -> dict:
    """Generated stories → BPE (cs336_basics) → uint16 token file, for the real trainer where no corpus exists."""
    import time

    import numpy as np

    from cs336_basics.corpus import write_corpus
    from cs336_basics.tokenizer import Tokenizer, train_bpe

    started = time.perf_counter()
    os.makedirs(args.work_dir, exist_ok=True)
    text = os.path.join(args.work_dir, "stories.txt")
    write_corpus(text, args.stories, seed=args.seed)
    vocab, merges = train_bpe(text, args.vocab_size, ["<|endoftext|>"])
    tokenizer = Tokenizer(vocab, merges, ["<|endoftext|>"])
    with open(text) as f:  # single process: cs336_basics' parallel encoder needs tqdm, absent on bare machines
        ids = np.fromiter(tokenizer.encode_iterable(f), dtype=np.uint16)
    np.save(args.out, ids)
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
    p.add_argument("--out-dir", default="fig")
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
    p.add_argument("--target", type=float, default=1e19)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--out-dir", default="fig")
    p.add_argument("--prefix", default="a3_study")
    p.add_argument("--report", default="assignment3-scaling/STUDY.md")
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
    p.add_argument("--figure-prefix", default="fig/a3_real")
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
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0

