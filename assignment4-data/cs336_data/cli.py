"""The `cs336-data` command: assets, extraction, filtering, deduplication, tokenization, quality classifier.

Every subcommand checks its inputs and options before writing anything, writes each output beside its
destination and renames it into place only on success, and refuses to write over one of its inputs. Expected
failures end as one line, `cs336-data: error: <what> (<which file>)`, exit 2; `filter` exits 1 when some inputs
failed (they are listed in report.json and the others are processed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cs336_basics.cli_support import (
    UserError,
    atomic_path,
    atomic_write,
    bounded,
    check_ranges,
    reading,
    refuse_overwriting_inputs,
    run_command,
)
from cs336_basics.cli_support.errors import describe
from cs336_data.assets import ASSETS, asset_path, bundled_path, download_asset, require_asset
from cs336_data.safe_io import atomic_outputs, distinct_names, out_file, out_folder, require_files


@dataclass
class CliNumbers:
    """The numeric options that belong to no library config, with their valid ranges (field name = flag);
    FilterConfig and MinHashConfig check their own."""

    workers: int | None = bounded(None, ge=1)
    timeout: float | None = bounded(None, gt=0)
    n: int | None = bounded(None, ge=1)
    epoch: int | None = bounded(None, ge=1)
    word_ngrams: int | None = bounded(None, ge=1)
    max_per_class: int | None = bounded(None, ge=1)
    k: int | None = bounded(None, ge=1)
    slurm_timeout_min: int | None = bounded(None, ge=1)
    seed: int | None = bounded(None, ge=0)
    # also checked here because --no-langid / --no-harmful drop them before FilterConfig sees them
    lang_threshold: float | None = bounded(None, ge=0, le=1)
    nsfw_threshold: float | None = bounded(None, ge=0, le=1)

    def __post_init__(self) -> None:
        check_ranges(self)

    @classmethod
    def check(cls, args: argparse.Namespace) -> None:
        cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal: in a log or a pipe they would bury the one-line result or error."""
    return sys.stderr.isatty() and not getattr(args, "no_progress", False)


def _assets(args: argparse.Namespace) -> int:
    if args.action == "list":
        if args.names:
            raise UserError(f"assets list takes no names (got {args.names[0]!r}); use `assets download NAME ...`")
        for name, asset in ASSETS.items():
            path = asset_path(name)
            state = ("bundled" if path == bundled_path(name) else "present") if path.is_file() else "missing"
            print(f"{name:<10} {state:<8} {path}  (${asset.env}; {asset.url or 'trained locally'})")
        return 0
    names = args.names or [n for n, a in ASSETS.items() if a.url and n != "wiki-urls"]
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise UserError(f"unknown asset {unknown[0]!r}; known: {', '.join(ASSETS)}")
    failed = 0
    for name in names:
        try:
            print(f"{name}: {download_asset(name, Path(args.dir) if args.dir else None, args.timeout, args.force)}")
        except (OSError, ValueError) as exc:
            print(f"cs336-data: error: {name}: {describe(exc)}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _extract(args: argparse.Namespace) -> int:
    from cs336_data.document import Document
    from cs336_data.extract import ExtractText
    from cs336_data.warc_io import read_whole, write_wet

    require_files([args.input])
    refuse_overwriting_inputs([args.out], [args.input])
    out_file(args.out)
    stats: Counter[str] = Counter()
    step = ExtractText()
    docs = (d for d in (step(doc) for doc in read_whole(args.input, "response", stats)) if d is not None)
    with atomic_path(args.out) as tmp:
        if str(args.out).endswith((".wet", ".wet.gz")):
            n = write_wet(tmp, docs)
        else:
            from xopen import xopen

            n = 0
            with xopen(tmp, "wt", threads=0) as out:
                for doc in docs:
                    out.write(json.dumps(Document.to_json(doc), ensure_ascii=False) + "\n")
                    n += 1
    print(json.dumps({"written": n, "read": dict(stats), "extract": dict(step.counters)}))
    return 0


def _filter(args: argparse.Namespace) -> int:
    from cs336_data.pipeline import FilterConfig, format_summary, run_filter, run_filter_slurm

    config = FilterConfig(
        input_kind="response" if args.input_kind == "warc" else "conversion",
        min_chars=args.min_chars,
        languages=args.lang,
        lang_threshold=None if args.no_langid else args.lang_threshold,
        nsfw_threshold=None if args.no_harmful else args.nsfw_threshold,
        toxic_threshold=args.toxic_threshold,
        gopher=not args.no_gopher,
        quality_threshold=args.quality_threshold,
        mask_pii=not args.no_pii,
        sample_dropped=args.sample_dropped,
    )
    if args.slurm:
        report = run_filter_slurm(args.inputs, args.out_dir, config, max_parallel=args.workers,
                                  slurm_partition=args.slurm_partition, timeout_min=args.slurm_timeout_min)
    else:
        report = run_filter(args.inputs, args.out_dir, config, workers=args.workers, progress=_progress(args))
    print(format_summary(report["summary"]))
    failed = report["summary"]["failed_files"]
    if failed:
        rest = "; the others were filtered" if len(failed) < report["summary"]["files"] else ""
        print(f"cs336-data: {len(failed)} of {report['summary']['files']} inputs failed (listed in "
              f"{Path(args.out_dir) / 'report.json'}){rest}", file=sys.stderr)
    return 1 if failed else 0


def _dedup(args: argparse.Namespace) -> int:
    from cs336_data.minhash import MinHashConfig

    # checked for `exact` too: a nonsense value is refused, not silently ignored
    MinHashConfig(args.num_hashes, args.num_bands, args.ngrams, args.threshold, args.seed, args.workers)
    inputs = require_files(args.inputs)
    distinct_names(inputs)
    refuse_overwriting_inputs([Path(args.out_dir) / p.name for p in inputs], inputs)
    out_folder(args.out_dir)
    if args.method == "exact":
        from cs336_data.dedup_exact import exact_line_deduplicate

        stats = exact_line_deduplicate(args.inputs, args.out_dir, progress=_progress(args))
        print(json.dumps(stats))
        return 0
    from cs336_data.corpus import FileCorpus, JsonlCorpus
    from cs336_data.minhash import minhash_deduplicate

    jsonl = args.jsonl or all(".jsonl" in p.name for p in inputs)  # filter's shards are JSONL, one doc a line
    corpus = JsonlCorpus(args.inputs) if jsonl else FileCorpus(args.inputs)
    result = minhash_deduplicate(corpus, args.out_dir, args.num_hashes, args.num_bands, args.ngrams, args.threshold,
                                 seed=args.seed, workers=args.workers, progress=_progress(args))
    print(json.dumps(dict(result.stats)))
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from cs336_data.tokenization import gpt2_encoding, iter_document_texts, tokenize_to_uint16

    require_files(args.inputs)
    refuse_overwriting_inputs([args.out], [*args.inputs, *([args.gpt2_vocab] if args.gpt2_vocab else [])])
    out_file(args.out)
    stats = tokenize_to_uint16(iter_document_texts(args.inputs), args.out, gpt2_encoding(args.gpt2_vocab),
                               workers=args.workers, progress=_progress(args), source=", ".join(args.inputs))
    print(json.dumps(stats))
    return 0


def _quality(args: argparse.Namespace) -> int:
    from cs336_data import quality

    if args.action == "sample-urls":
        source = require_files([args.urls])[0] if args.urls else require_asset("wiki-urls")
        refuse_overwriting_inputs([args.out], [source])
        out_file(args.out)
        urls = quality.sample_urls(source, args.n, args.seed, progress=_progress(args))
        if not urls:
            raise UserError(f"no URLs in {source}; {args.out} not written")
        with atomic_write(args.out) as f:
            f.write("\n".join(urls) + "\n")
        print(f"{len(urls)} URLs in {args.out}; fetch them with:\n"
              f"  wget --timeout=5 --tries=1 -i {args.out} --warc-file={Path(args.out).stem} -O /dev/null")
        return 0
    inputs = require_files([*args.positives, *args.negatives])
    both = [p for p in map(Path, args.positives) if any(p.samefile(n) for n in map(Path, args.negatives))]
    if both:
        raise UserError(f"{both[0]} is among both --positives and --negatives; the classifier would learn nothing")
    work, model = Path(args.work_dir), out_file(args.out or asset_path("quality"))
    out_folder(work, "--work-dir")
    steps = []
    if not args.no_filter:
        from cs336_data.gopher import GopherFilter
        from cs336_data.langid import LanguageFilter

        steps = [LanguageFilter(["en"], 0.65), GopherFilter()]
    # the training files and the model replace earlier ones together, only once training and evaluation succeed
    with atomic_outputs([work / "quality.train", work / "quality.valid", model], inputs) as (train, valid, tmp):
        split = quality.write_training_data(quality.iter_texts(args.positives), quality.iter_texts(args.negatives),
                                            work, steps, args.max_per_class, seed=args.seed, files=(train, valid))
        quality.train_quality_classifier(split.train, tmp, epoch=args.epoch, word_ngrams=args.word_ngrams)
        scores = quality.evaluate(tmp, split.valid)
    print(json.dumps({"model": str(model), "counts": split.counts, "valid": scores}))
    return 0


def _classify(args: argparse.Namespace) -> int:
    if args.file == "-":
        text = sys.stdin.read()
    else:
        from xopen import xopen

        require_files([args.file])
        with reading(args.file), xopen(args.file, "rt", threads=0, encoding="utf-8", errors="replace") as f:
            text = f.read()  # a .gz file decompressed, not classified as compressed bytes
    if not text.strip() and args.what not in ("gopher", "pii"):
        raise UserError(f"{'standard input' if args.file == '-' else args.file} holds no text to classify")
    if args.what == "gopher":
        from cs336_data.gopher import GopherRules

        failed = GopherRules().failures(text)
        print(json.dumps({"keep": not failed, "failed": failed}))
        return 0
    if args.what == "pii":
        from cs336_data.pii import mask_pii

        masked, counts = mask_pii(text)
        print(json.dumps(counts))
        print(masked)
        return 0
    from cs336_data.fasttext_model import load_classifier

    asset = {"lang": "lid", "nsfw": "nsfw", "toxic": "toxic", "quality": "quality"}[args.what]
    print(json.dumps(load_classifier(asset).predict(text, args.k)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cs336-data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", help="list or download the fastText models")
    a.add_argument("action", choices=["list", "download"])
    a.add_argument("names", nargs="*", metavar="NAME", help=f"assets to download, of {', '.join(ASSETS)} "
                   "(default: the three models)")
    a.add_argument("--dir", help="target folder (default: $CS336_DATA_CACHE or ~/.cache/cs336_data)")
    a.add_argument("--timeout", type=float, default=30.0)
    a.add_argument("--force", action="store_true")
    a.set_defaults(func=_assets)

    e = sub.add_parser("extract", help="WARC responses -> extracted text (JSONL, or WET when --out ends in .wet[.gz])")
    e.add_argument("input")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_extract)

    f = sub.add_parser("filter", help="WET/WARC files -> filtered JSONL shards + report.json",
                       description="Filter crawl files into OUT_DIR/NAME.jsonl.gz shards and OUT_DIR/report.json. "
                       "An input that cannot be read, or is damaged partway, is listed in report.json under "
                       "failed_files with the reason while the others are processed; the exit code is then 1.")
    f.add_argument("inputs", nargs="+")
    f.add_argument("--out-dir", required=True)
    f.add_argument("--workers", type=int, default=1)
    f.add_argument("--input-kind", choices=["wet", "warc"], default="wet")
    f.add_argument("--min-chars", type=int, default=200)
    f.add_argument("--lang", nargs="+", default=["en"])
    f.add_argument("--lang-threshold", type=float, default=0.65)
    f.add_argument("--no-langid", action="store_true")
    f.add_argument("--nsfw-threshold", type=float, default=0.5)
    f.add_argument("--toxic-threshold", type=float, default=0.5)
    f.add_argument("--no-harmful", action="store_true")
    f.add_argument("--no-gopher", action="store_true")
    f.add_argument("--quality-threshold", type=float, default=None, help="keep P(wiki) >= this (off by default)")
    f.add_argument("--no-pii", action="store_true")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--sample-dropped", type=int, default=0, metavar="N",
                   help="also write up to N dropped documents per step and file to *.dropped.jsonl.gz")
    f.add_argument("--slurm", action="store_true", help="run as a Slurm array via submitit (--workers = parallel)")
    f.add_argument("--slurm-partition", default=None)
    f.add_argument("--slurm-timeout-min", type=int, default=15)
    f.set_defaults(func=_filter)

    d = sub.add_parser("dedup", help="exact line or MinHash document deduplication")
    d.add_argument("method", choices=["exact", "minhash"])
    d.add_argument("inputs", nargs="+")
    d.add_argument("--out-dir", required=True)
    d.add_argument("--jsonl", action="store_true", help="minhash: one document per JSONL line, not per file")
    d.add_argument("--num-hashes", type=int, default=100)
    d.add_argument("--num-bands", type=int, default=10)
    d.add_argument("--ngrams", type=int, default=5)
    d.add_argument("--threshold", type=float, default=0.8)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=1)
    d.set_defaults(func=_dedup)

    t = sub.add_parser("tokenize", help="JSONL/text documents -> uint16 GPT-2 token file")
    t.add_argument("inputs", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--gpt2-vocab", default=None, help="GPT-2 vocab.json to build the encoding offline")
    t.add_argument("--workers", type=int, default=1)
    t.set_defaults(func=_tokenize)

    q = sub.add_parser("quality", help="sample Wikipedia reference URLs, or train the quality classifier")
    q.add_argument("action", choices=["sample-urls", "train"])
    q.add_argument("--urls", help="sample-urls: the reference URL list (default: the wiki-urls asset)")
    q.add_argument("--n", type=int, default=20000)
    q.add_argument("--out", default=None, help="sample-urls: URL file; train: model path (default: quality asset)")
    q.add_argument("--positives", nargs="+", default=[], help="train: WARC/WET/text files of wiki-linked pages")
    q.add_argument("--negatives", nargs="+", default=[], help="train: WARC/WET/text files of random CC pages")
    q.add_argument("--work-dir", default="quality_data")
    q.add_argument("--max-per-class", type=int, default=None)
    q.add_argument("--no-filter", action="store_true", help="train: skip the English + Gopher cleaning")
    q.add_argument("--epoch", type=int, default=10)
    q.add_argument("--word-ngrams", type=int, default=2)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_quality)

    c = sub.add_parser("classify", help="run one classifier or rule on a text file ('-' for stdin)")
    c.add_argument("what", choices=["lang", "nsfw", "toxic", "quality", "gopher", "pii"])
    c.add_argument("file")
    c.add_argument("-k", "--k", type=int, default=1, help="top k labels")
    c.set_defaults(func=_classify)
    return p


def _run(args: argparse.Namespace) -> int:
    """The subcommand, after the checks every subcommand shares."""
    CliNumbers.check(args)
    if args.command == "quality" and args.action == "sample-urls" and not args.out:
        args.out = "sampled_urls.txt"
    if args.command == "quality" and args.action == "train" and not (args.positives and args.negatives):
        raise UserError("quality train needs --positives and --negatives")
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the arguments and runs the subcommand inside the shared error boundary (`run_command`)."""
    args = build_parser().parse_args(argv)
    code = 0

    def call() -> None:
        nonlocal code
        code = _run(args)

    return run_command("cs336-data", call) or code
