"""`cs336-basics`: train a tokenizer, encode text, train and sample a language model, plot, quickstart."""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing

from cs336_basics.artifacts import (
    DEFAULT_SPECIAL,
    check_vocab_size,
    checkpoint_path,
    figure_path,
    load_tokenizer,
    load_trained_model,
    sample_text,
)
from cs336_basics.cli_support import (
    OneLineParser,
    UserError,
    check_output,
    range_help,
    reading,
    refuse_overwriting_inputs,
    run_command,
)
from cs336_basics.training.config import PRESETS, TrainConfig

__all__ = [
    "build_parser",
    "check_generation",
    "check_vocab_size",
    "config_from_args",
    "figure_path",
    "load_tokenizer",
    "load_trained_model",
    "main",
    "sample_text",
]
PROG = "cs336-basics"


def _peak_rss_mb() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return max(own, children) * scale / 2**20


def _existing_file(path: str) -> str:
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def _nonempty(path: str, flag: str) -> None:
    """An empty text file would train or encode nothing and fail later, far from its cause."""
    if os.path.getsize(path) == 0:
        raise UserError(f"{flag} {path} is empty")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# ---------------------------------------------------------------------------------------------- tokenizer
def cmd_train_tokenizer(args) -> dict:
    check_vocab_size(args.vocab_size, args.special_token)
    _nonempty(args.input, "--input")
    check_output(args.out_dir, "--out-dir", folder=True)
    files = [os.path.join(args.out_dir, n) for n in ("vocab.json", "merges.txt")]
    refuse_overwriting_inputs(files, [args.input])
    if not args.overwrite and any(os.path.exists(f) for f in files):
        raise UserError(f"--out-dir {args.out_dir} already holds a tokenizer (vocab.json, merges.txt); pass "
                        f"--overwrite to replace it")
    from cs336_basics.tokenizer import save_tokenizer, train_bpe
    start = time.perf_counter()
    with reading(args.input):
        vocab, merges = train_bpe(args.input, args.vocab_size, args.special_token, num_workers=args.workers,
                                  progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    if len(vocab) < args.vocab_size:
        print(f"{PROG} train-tokenizer: note: {args.input} has no more pairs to merge; the vocabulary has "
              f"{len(vocab)} tokens, not {args.vocab_size}", file=sys.stderr)
    save_tokenizer(vocab, merges, args.out_dir)
    longest = max(vocab.values(), key=len)
    report = {"vocab_size": len(vocab), "merges": len(merges), "seconds": round(seconds, 3),
              "peak_rss_mb": round(_peak_rss_mb(), 1), "longest_token": longest.decode("utf-8", "replace"),
              "longest_token_bytes": len(longest), "out_dir": args.out_dir}
    print(json.dumps(report, ensure_ascii=False))
    return report


def cmd_encode(args) -> dict:
    refuse_overwriting_inputs([args.output], [args.input])
    check_output(args.output, "--output")
    if not args.overwrite and os.path.exists(args.output):
        raise UserError(f"--output {args.output} exists; pass --overwrite to replace it")
    _nonempty(args.input, "--input")
    tokenizer = load_tokenizer(args.tokenizer, args.special_token)
    from cs336_basics.encode import encode_file

    start = time.perf_counter()
    with reading(args.input):
        num_tokens = encode_file(tokenizer, args.input, args.output, num_workers=args.workers,
                                 progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    num_bytes = os.path.getsize(args.input)
    report = {"tokens": num_tokens, "bytes": num_bytes, "bytes_per_token": round(num_bytes / max(num_tokens, 1), 3),
              "seconds": round(seconds, 3), "mb_per_s": round(num_bytes / 1e6 / seconds, 3), "output": args.output}
    print(json.dumps(report))
    return report


# ---------------------------------------------------------------------------------------------- training
NONE = "none"  # what an optional flag (--num-kv-heads, --sliding-window) takes to clear a preset's value


class _Unset:
    """The parsed value of an optional flag given as 'none' (argparse's None means "not given")."""


UNSET = _Unset()


def _optional(kind: type):
    def parse(text: str):
        return UNSET if text.lower() == NONE else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults stay None so a preset's values show through."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        help_text = f"default: {field.default}{range_help(field)}"
        optional = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=None, help=help_text)
        elif type(None) in typing.get_args(hint) and len(optional) == 1:
            parser.add_argument(flag, type=_optional(optional[0]), default=None, metavar=optional[0].__name__.upper(),
                                help=f"{help_text} ('{NONE}': unset)")
        else:
            parser.add_argument(flag, type=hint, default=None, help=help_text)


def config_overrides(args, exclude: tuple[str, ...] = ()) -> dict:
    """The TrainConfig fields given on the command line (an optional one given as 'none' becomes None)."""
    overrides = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None and field.name not in exclude:
            overrides[field.name] = None if value is UNSET else value
    return overrides


def config_from_args(args) -> TrainConfig:
    from cs336_basics.training.config import config_from_preset

    return config_from_preset(args.preset, **config_overrides(args))


def cmd_train(args) -> dict:
    from cs336_basics.training import train
    from cs336_basics.training.distributed import env_rank

    try:
        try:
            config = config_from_args(args)
        except UserError as e:
            e.every_rank = True
            raise
        summary = train(config)
    except UserError as e:  # under torchrun, an error every rank meets is reported by rank 0 alone
        if env_rank() != 0 and getattr(e, "every_rank", False):
            e.reported_elsewhere = True
        raise
    if env_rank() == 0:
        print(json.dumps(summary))
    return summary


def cmd_consolidate(args) -> dict:
    from cs336_basics.training.dist_checkpoint import consolidate

    if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
        raise UserError(f"--run-dir {args.run_dir} is a file; expected a folder")
    if args.out is not None:
        check_output(args.out, "--out")
    report = consolidate(args.run_dir, args.out)
    print(json.dumps(report))
    return report


def check_generation(model, tokenizer, prompts: list[str], max_new_tokens: int) -> int:
    """What `generate` can do with these prompts: a tokenizer with ids the model has no embedding for, an empty
    prompt or one longer than the context are refused; a request past the context is cut, and said so.
    Returns the number of new tokens that will be asked for."""
    vocab_size, context = model.config.vocab_size, model.config.context_length
    largest = max(tokenizer.vocab)
    if largest >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {largest} but the model's vocabulary has {vocab_size}: "
                        "use the tokenizer the run was trained with")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the shell could not decode arrive as lone surrogates
            raise UserError(f"--prompt {prompt.encode('utf-8', 'backslashreplace').decode()!r} is not valid "
                            "UTF-8") from e
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    if min(lengths) == 0:
        raise UserError("--prompt must not be empty")
    if max(lengths) > context:
        raise UserError(f"a --prompt of {max(lengths)} tokens exceeds the model's context of {context} tokens")
    room = context - max(lengths)
    if max_new_tokens > room:
        print(f"{PROG} generate: note: --max-new-tokens {max_new_tokens} cut to {room}: the model's context is "
              f"{context} tokens and the longest prompt takes {max(lengths)}", file=sys.stderr)
    return min(max_new_tokens, room)


def cmd_generate(args) -> list[str]:
    checkpoint_path(args.run_dir)
    tokenizer = load_tokenizer(args.tokenizer, [DEFAULT_SPECIAL])
    model = load_trained_model(args.run_dir, args.device)
    max_new_tokens = check_generation(model, tokenizer, args.prompt, args.max_new_tokens)
    texts = sample_text(model, tokenizer, args.prompt, max_new_tokens, args.temperature, args.top_p, args.seed)
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"### {prompt}{text}\n")
    return texts


def cmd_plot(args) -> str:
    from cs336_basics.plotting import plot_runs

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise UserError(f"--labels gives {len(args.labels)} label(s) for {len(args.runs)} run(s)")
    out = figure_path(args.out)
    check_output(out, "--out")
    path = plot_runs(args.runs, out, args.labels, args.title)
    print(f"wrote {path}")
    return path


def cmd_sweep(args) -> dict:
    from cs336_basics.experiments import run_sweep

    overrides = config_overrides(args, exclude=("out_dir",))
    figure = figure_path(args.figure or f"fig/sweep_{args.kind}.png")
    results = run_sweep(args.kind, args.values, args.preset, args.out_root, figure, **overrides)
    print(json.dumps(results, default=str))
    return results


def cmd_quickstart(args) -> dict:
    from cs336_basics.quickstart import quickstart

    return quickstart(args)


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on a text file")
    p.add_argument("--input", required=True, type=_existing_file)
    p.add_argument("--vocab-size", required=True, type=_positive_int)
    p.add_argument("--special-token", action="append", default=None, help=f"repeatable; default {DEFAULT_SPECIAL}")
    p.add_argument("--out-dir", required=True, help="writes vocab.json and merges.txt (GPT-2 format) here")
    p.add_argument("--workers", type=_positive_int, default=None, help="pre-tokenization processes (default: cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out-dir")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("encode", help="encode a text file into a uint16 .npy token array")
    p.add_argument("--tokenizer", required=True, help="folder with vocab.json and merges.txt")
    p.add_argument("--input", required=True, type=_existing_file)
    p.add_argument("--output", required=True, help="destination .npy")
    p.add_argument("--special-token", action="append", default=None, help=f"repeatable; default {DEFAULT_SPECIAL}")
    p.add_argument("--workers", type=_positive_int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("train", help="train a Transformer LM on encoded token files",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="start from a named configuration")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="the handout's experiments: learning rate, batch size, ablations",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("kind", choices=["lr", "batch-size", "ablations"])
    p.add_argument("--values", nargs="*", default=[], help="learning rates, batch sizes or ablation names")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tinystories-17m")
    p.add_argument("--out-root", default="runs/sweeps")
    p.add_argument("--figure", default=None, help="default: fig/sweep_<kind>.png")
    _add_config_flags(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("consolidate", help="write a ddp/fsdp run's newest sharded checkpoint as one checkpoint.pt")
    p.add_argument("--run-dir", required=True, help="the --out-dir of a `train --parallel ddp|fsdp` run")
    p.add_argument("--out", default=None, help="default: <run-dir>/checkpoint.pt (what generate and export-hf read)")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("generate", help="sample continuations from a trained run")
    p.add_argument("--run-dir", required=True, help="the --out-dir of a `train` run")
    p.add_argument("--tokenizer", required=True, help="folder with vocab.json and merges.txt")
    p.add_argument("--prompt", action="append", required=True, help="repeatable: one batch of prompts")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plot", help="plot learning curves of runs (loss vs step and vs wall-clock)")
    p.add_argument("--runs", nargs="+", required=True, help="run folders holding metrics.jsonl")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--out", required=True, help="output image, e.g. fig/lr_sweep.png (a folder: <folder>/loss.png)")
    p.add_argument("--title", default="")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("quickstart", help="tokenizer → encode → train → sample on a generated corpus, offline")
    p.add_argument("--out-dir", default="runs/quickstart")
    p.add_argument("--train-text", type=_existing_file, default=None, help="real data instead of the generated corpus")
    p.add_argument("--val-text", type=_existing_file, default=None)
    p.add_argument("--vocab-size", type=_positive_int, default=None)
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--figure", default=None, help="learning-curve image (default: <out-dir>/quickstart_loss.png)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out-dir that holds a quickstart")
    p.set_defaults(func=cmd_quickstart)

    from cs336_basics.hf.cli import add_commands as add_hf_commands  # torch-free until a command runs

    add_hf_commands(sub)
    return parser


def check_arguments(args) -> None:
    """Values argparse's types let through: an empty special token, sampling settings out of range (NaN and inf
    included: a NaN temperature crashed the sampler, an infinite one sampled uniformly)."""
    if "" in (getattr(args, "special_token", None) or ()):
        raise UserError("--special-token must not be empty")
    if args.command == "generate":
        if not (math.isfinite(args.temperature) and args.temperature >= 0):
            raise UserError(f"--temperature must be finite and >= 0, got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise UserError(f"--top-p must be > 0 and <= 1, got {args.top_p}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "special_token", "unset") is None:
        args.special_token = [DEFAULT_SPECIAL]

    def call():
        check_arguments(args)
        return args.func(args)

    return run_command(f"{PROG} {args.command}", call)
