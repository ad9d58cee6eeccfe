"""The whole assignment-1 pipeline in one command, offline by default (see `cs336-basics quickstart`)."""

import json
import os
import time

from cs336_basics.artifacts import DEFAULT_SPECIAL, check_vocab_size, figure_path
from cs336_basics.cli_support import UserError, atomic_write, check_output, reading, refuse_overwriting_inputs

RUN_MARKERS = ("checkpoint.pt", "metrics.jsonl")


def _step(title: str):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def figure_destination(out_dir: str, figure: str | None) -> str:
    """The learning curve goes into the quickstart's own folder unless `--figure` asks for a place: a run
    never overwrites the repository's committed fig/quickstart_loss.png by default."""
    return figure_path(figure or os.path.join(out_dir, "quickstart_loss.png"))


def quickstart(args) -> dict:
    started = time.perf_counter()
    out = args.out_dir
    data_dir, tokenizer_dir, run_dir = (os.path.join(out, name) for name in ("data", "tokenizer", "run"))
    vocab_size = args.vocab_size or (1_000 if not args.train_text else 10_000)
    figure_out = figure_destination(out, args.figure)
    check_arguments(args, run_dir, vocab_size)
    if args.train_text:
        outputs = [os.path.join(data_dir, f"{split}.npy") for split in ("train", "val")]
        refuse_overwriting_inputs([*outputs, figure_out, os.path.join(out, "quickstart.json")],
                                  [args.train_text, args.val_text])
    # Imported only now: the checks above answer before the seconds these take to load.
    from cs336_basics.artifacts import load_tokenizer, load_trained_model, sample_text
    from cs336_basics.corpus import write_corpus
    from cs336_basics.encode import encode_file
    from cs336_basics.plotting import plot_runs
    from cs336_basics.tokenizer import save_tokenizer, train_bpe
    from cs336_basics.training import train
    from cs336_basics.training.config import config_from_preset

    os.makedirs(data_dir, exist_ok=True)
    timings: dict[str, float] = {}

    t = _step("corpus")
    if args.train_text:
        train_text, val_text = args.train_text, args.val_text
        print(f"using {train_text} and {val_text}")
    else:
        train_text, val_text = os.path.join(data_dir, "train.txt"), os.path.join(data_dir, "val.txt")
        size = write_corpus(train_text, num_stories=6_000, seed=0)
        write_corpus(val_text, num_stories=500, seed=1)
        print(f"generated {size / 1e6:.2f} MB of stories in {train_text}")
    timings["corpus_s"] = time.perf_counter() - t

    t = _step("train tokenizer")
    with reading(train_text):
        vocab, merges = train_bpe(train_text, vocab_size, [DEFAULT_SPECIAL])
    save_tokenizer(vocab, merges, tokenizer_dir)
    timings["tokenizer_s"] = time.perf_counter() - t
    print(f"{len(vocab)} tokens in {timings['tokenizer_s']:.1f}s; longest: {max(vocab.values(), key=len)!r}")

    t = _step("encode")
    tokenizer = load_tokenizer(tokenizer_dir, [DEFAULT_SPECIAL])
    paths = {}
    for split, text in (("train", train_text), ("val", val_text)):
        paths[split] = os.path.join(data_dir, f"{split}.npy")
        with reading(text):
            n = encode_file(tokenizer, text, paths[split])
        print(f"{split}: {n:,} tokens, {os.path.getsize(text) / n:.2f} bytes/token")
    timings["encode_s"] = time.perf_counter() - t

    t = _step("train")
    overrides = dict(train_data=paths["train"], val_data=paths["val"], out_dir=run_dir, vocab_size=vocab_size,
                     device=args.device, overwrite=args.overwrite)
    if args.steps:
        overrides["max_steps"] = args.steps
    summary = train(config_from_preset("quickstart", **overrides))
    timings["train_s"] = time.perf_counter() - t

    t = _step("plot")
    figure = plot_runs([run_dir], figure_out, labels=["quickstart"], title="quickstart: generated stories")
    print(f"wrote {figure}")

    _step("sample")
    model = load_trained_model(run_dir, args.device)
    sample = sample_text(model, tokenizer, ["Once upon a time,"], max_new_tokens=120, temperature=0.7,
                         top_p=0.95, seed=0)[0]
    print("Once upon a time," + sample)
    timings["total_s"] = time.perf_counter() - started

    report = {"val_loss": summary["val_loss"], "train_loss": summary["train_loss"], "steps": summary["steps"],
              "figure": figure, "sample": "Once upon a time," + sample,
              **{k: round(v, 2) for k, v in timings.items()}}
    with atomic_write(os.path.join(out, "quickstart.json")) as f:
        json.dump(report, f, indent=2)
    print(f"\nvalidation loss {summary['val_loss']:.3f} after {summary['steps']} steps; "
          f"total {timings['total_s']:.0f}s")
    return report


def check_arguments(args, run_dir: str, vocab_size: int) -> None:
    """Everything that would make the quickstart fail after minutes of work, checked before any of it: a run
    already in --out-dir (needs --overwrite), real data given by halves or empty, a vocabulary too small."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir} exists and is not a folder")
    check_output(args.out_dir, "--out-dir", folder=True)
    check_output(figure_destination(args.out_dir, args.figure), "--figure")
    present = [m for m in RUN_MARKERS if os.path.exists(os.path.join(run_dir, m))]
    if present and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds a quickstart run ({run_dir}); pass --overwrite to start "
                        "over or choose another --out-dir")
    if bool(args.train_text) != bool(args.val_text):
        raise UserError("--train-text and --val-text go together")
    for flag, path in (("--train-text", args.train_text), ("--val-text", args.val_text)):
        if path and os.path.getsize(path) == 0:
            raise UserError(f"{flag} {path} is empty")
    check_vocab_size(vocab_size, [DEFAULT_SPECIAL])
    if vocab_size > 2**16:  # encode writes uint16 ids
        raise UserError(f"--vocab-size must be <= {2**16} (the token files hold uint16 ids), got {vocab_size}")
    from cs336_basics.training.trainer import resolve_device  # torch: last, after the checks that need none

    resolve_device(args.device)  # a bad --device named now, not after the tokenizer and the encoding
