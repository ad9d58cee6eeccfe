"""The filtering pipeline: WET (or WARC) files in, JSONL shards of surviving documents out, with a report.

Each input file is one task; tasks run in a process pool (or as a Slurm array through submitit). Inside a task a
document that makes a step raise is dropped and counted under that step's `errors`, and a file that cannot be
read (missing, a folder, not gzip, not a WARC/WET, empty, the other kind) is reported as failed with the reason
and writes no shard: neither stops the run. A file damaged partway (truncated download) is reported as failed
too, with `partial: true`: the whole records before the damage are filtered and kept in its shard. Each shard,
and report.json, is renamed into place only once complete, so a failure never leaves half a file over an old one.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from xopen import xopen

from cs336_basics.cli_support import (
    UserError,
    atomic_path,
    atomic_write,
    bounded,
    check_ranges,
    refuse_overwriting_inputs,
)
from cs336_basics.cli_support.errors import describe
from cs336_data.document import Document, Step, step_report
from cs336_data.extract import ExtractText
from cs336_data.gopher import GopherFilter
from cs336_data.pii import MaskPII
from cs336_data.safe_io import distinct_names, out_folder
from cs336_data.warc_io import damage, iter_warc_documents


@dataclass
class FilterConfig:
    """Which steps run, in this order: extract (WARC only), min length, langid, harmful, gopher, quality, PII.

    Numeric fields carry their valid range (field name = CLI flag), checked when the config is built."""

    input_kind: str = "conversion"  # "conversion" for WET, "response" for WARC
    min_chars: int = bounded(200, ge=0)
    languages: list[str] = field(default_factory=lambda: ["en"])
    lang_threshold: float | None = bounded(0.65, ge=0, le=1)  # None disables language ID
    nsfw_threshold: float | None = bounded(0.5, ge=0, le=1)  # None disables the harmful-content step
    toxic_threshold: float = bounded(0.5, ge=0, le=1)
    gopher: bool = True
    quality_threshold: float | None = bounded(None, ge=0, le=1)  # None disables the quality classifier
    mask_pii: bool = True
    sample_dropped: int = bounded(0, ge=0)  # keep up to this many dropped documents per step and file
    lid_model: str | None = None
    nsfw_model: str | None = None
    toxic_model: str | None = None
    quality_model: str | None = None

    def __post_init__(self) -> None:
        if self.input_kind not in ("conversion", "response"):
            raise UserError(f"input kind must be 'conversion' (WET) or 'response' (WARC), got {self.input_kind!r}")
        check_ranges(self)


class MinLength(Step):
    """Drops documents shorter than `min_chars` after stripping whitespace."""

    name = "min_length"

    def __init__(self, min_chars: int) -> None:
        super().__init__()
        self.min_chars = min_chars

    def apply(self, doc: Document) -> Document | None:
        return doc if len(doc.text.strip()) >= self.min_chars else None


def build_steps(config: FilterConfig) -> list[Step]:
    """Instantiate the enabled steps; a model-backed step raises MissingModelError here, before any work."""
    steps: list[Step] = []
    if config.input_kind == "response":
        steps.append(ExtractText())
    steps.append(MinLength(config.min_chars))
    if config.lang_threshold is not None:
        from cs336_data.langid import LanguageFilter

        steps.append(LanguageFilter(config.languages, config.lang_threshold, config.lid_model))
    if config.nsfw_threshold is not None:
        from cs336_data.harmful import HarmfulFilter

        steps.append(HarmfulFilter(config.nsfw_threshold, config.toxic_threshold, config.nsfw_model,
                                   config.toxic_model))
    if config.gopher:
        steps.append(GopherFilter())
    if config.quality_threshold is not None:
        from cs336_data.quality import QualityFilter

        steps.append(QualityFilter(config.quality_threshold, config.quality_model))
    if config.mask_pii:
        steps.append(MaskPII())
    return steps


def run_steps_safely(docs: Iterable[Document], steps: list[Step],
                     on_drop: Callable[[str, Document], None] | None = None,
                     first_errors: dict[str, str] | None = None) -> Iterator[Document]:
    """Like `run_steps`, but a step that raises on a document drops it and counts an error for that step.

    `on_drop(step_name, document)` sees every dropped document (for sampling what each step removes);
    `first_errors` (if given) receives each failing step's first error message, for the report.
    """
    for doc in docs:
        out: Document | None = doc
        for step in steps:
            try:
                out = step(out)
            except Exception as exc:
                step.counters["errors"] += 1
                if first_errors is not None:
                    first_errors.setdefault(step.name, f"{type(exc).__name__}: {exc}")
                out = None
            if out is None:
                if on_drop is not None:
                    on_drop(step.name, doc)
                break
        if out is not None:
            yield out


def _count_bytes(docs: Iterable[Document], stats: Counter[str]) -> Iterator[Document]:
    """Pass documents through, adding their payload size (UTF-8 text, or raw HTML) to `stats['payload_bytes']`."""
    for doc in docs:
        html = doc.meta.get("html")
        stats["payload_bytes"] += len(html) if html is not None else len(doc.text.encode("utf-8"))
        yield doc


class _NothingRead(Exception):
    """A file that yielded no document to filter (its reason is the message); its shard is not written."""


def _filter_into(input_path: str, output_path: str, config: FilterConfig, steps: list[Step],
                 read_stats: Counter[str], first_errors: dict[str, str]) -> tuple[int, str | None]:
    """Filter one file into its shard (renamed into place only if the file gave at least one record);
    returns the documents kept and what damage, if any, ended the reading early."""
    dropped: dict[str, list[dict[str, Any]]] = {}

    def sample(step_name: str, doc: Document) -> None:
        bucket = dropped.setdefault(step_name, [])
        if len(bucket) < config.sample_dropped:
            bucket.append({"step": step_name, **doc.to_json()})

    kept = 0
    with atomic_path(output_path) as tmp:
        with xopen(tmp, "wt", threads=0) as out:
            docs = _count_bytes(iter_warc_documents(input_path, config.input_kind, read_stats), read_stats)
            for doc in run_steps_safely(docs, steps, sample if config.sample_dropped else None, first_errors):
                out.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
                kept += 1
        problem = damage(read_stats, config.input_kind)
        if problem and read_stats.get("other_kind") and not read_stats.get("records"):
            problem += f" (pass --input-kind {'warc' if config.input_kind == 'conversion' else 'wet'})"
        if problem and not read_stats.get("records"):
            raise _NothingRead(problem)
    if config.sample_dropped:
        with atomic_path(dropped_name(output_path)) as tmp, xopen(tmp, "wt", threads=0) as out:
            for rows in dropped.values():
                out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return kept, problem


def filter_file(input_path: str, output_path: str, config: FilterConfig) -> dict[str, Any]:
    """Filter one crawl file into one JSONL shard (gzip when the name ends in .gz); returns its report.

    Never raises for a bad file: `ok: false` with the reason (`partial: true` when records before the damage
    were kept)."""
    start = time.perf_counter()
    report: dict[str, Any] = {"input": input_path, "output": output_path, "bytes_in": 0}
    read_stats: Counter[str] = Counter()
    try:
        report["bytes_in"] = os.path.getsize(input_path)
        if os.path.isdir(input_path):
            raise UserError(f"{input_path} is a folder; expected a WARC/WET file")
        steps = build_steps(config)
        first_errors: dict[str, str] = {}
        kept, problem = _filter_into(input_path, output_path, config, steps, read_stats, first_errors)
        report.update(ok=problem is None, kept=kept, steps=step_report(steps))
        if first_errors:
            report["step_errors"] = first_errors
        if problem:
            report.update(error=problem, partial=True)
        elif broken := _step_failing_everything(steps, first_errors):
            report.update(ok=False, error=broken)
    except _NothingRead as exc:
        report.update(ok=False, error=str(exc), kept=0, steps={})
    except Exception as exc:  # one bad file is reported, never the end of the run
        report.update(ok=False, error=f"{type(exc).__name__}: {describe(exc)}", kept=0, steps={})
    report["read"] = dict(read_stats)
    report["seconds"] = time.perf_counter() - start
    return report


def _step_failing_everything(steps: list[Step], first_errors: dict[str, str]) -> str | None:
    """A step that raised on every document it saw is no filter but a failure (0 documents kept, not silently)."""
    for step in steps:
        seen, errors = step.counters.get("seen", 0), step.counters.get("errors", 0)
        if seen and errors == seen:
            return f"step {step.name} raised on all {seen} documents: {first_errors.get(step.name, '')}"
    return None


def dropped_name(shard: str) -> str:
    """`out/x.jsonl.gz` -> `out/dropped/x.jsonl.gz`: a shard's dropped samples, in a subfolder so that a glob
    over the shards (`out/*.jsonl.gz`, as the next command takes them) never mixes dropped documents back in."""
    return str(Path(shard).parent / "dropped" / Path(shard).name)


def output_name(input_path: str) -> str:
    """`CC-x.warc.wet.gz` -> `CC-x.jsonl.gz`: crawl and compression suffixes dropped, whatever their order."""
    name = Path(input_path).name
    while (stripped := name.removesuffix(".gz").removesuffix(".wet").removesuffix(".warc")) != name:
        name = stripped
    return name + ".jsonl.gz"


def summarize(reports: list[dict[str, Any]], wall_seconds: float, workers: int) -> dict[str, Any]:
    """Totals over files: per-step counters summed, read statistics, throughput in MB/s overall and per worker.

    `input_mb` is the size of the files as stored (compressed); `text_mb` the payload read from them.
    """
    steps: dict[str, Counter[str]] = {}
    read: Counter[str] = Counter()
    for rep in reports:
        read.update(rep.get("read", {}))
        for name, counts in rep.get("steps", {}).items():
            steps.setdefault(name, Counter()).update(counts)
    mb = sum(r["bytes_in"] for r in reports) / 1e6
    return {
        "files": len(reports),
        "failed_files": [{"input": r["input"], "error": r["error"], "partial": bool(r.get("partial"))}
                         for r in reports if not r.get("ok")],
        "documents_read": read.get("records", 0),
        "documents_kept": sum(r.get("kept", 0) for r in reports),
        "read": dict(read),
        "steps": {name: dict(c) for name, c in steps.items()},
        "input_mb": mb,
        "text_mb": read.get("payload_bytes", 0) / 1e6,
        "wall_seconds": wall_seconds,
        "mb_per_second": mb / wall_seconds if wall_seconds else 0.0,
        "mb_per_second_per_worker": mb / wall_seconds / workers if wall_seconds else 0.0,
        "cpu_seconds": sum(r["seconds"] for r in reports),
    }


def run_filter(inputs: list[str], out_dir: str, config: FilterConfig, workers: int = 1,
               progress: bool = True) -> dict[str, Any]:
    """Filter many files in a process pool; writes `report.json` (summary, config, per-file reports) to out_dir.

    Refused before any work (a `UserError`): a missing model, an output folder that is a file, two inputs whose
    shards would share a name, an output that would overwrite an input."""
    build_steps(config)  # fail fast, in the parent, on a missing model
    out = out_folder(out_dir)
    jobs = _jobs(inputs, out, config)
    start = time.perf_counter()
    reports: list[dict[str, Any]] = []
    if workers <= 1:
        for inp, outp in tqdm(jobs, desc="filter", unit=" files", disable=not progress):
            reports.append(filter_file(inp, outp, config))
    else:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(filter_file, inp, outp, config) for inp, outp in jobs]
            for fut in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="filter",
                            unit=" files", disable=not progress):
                reports.append(fut.result())
    summary = summarize(reports, time.perf_counter() - start, max(1, workers))
    full = {"summary": summary, "config": asdict(config), "files": sorted(reports, key=lambda r: r["input"])}
    with atomic_write(out / "report.json") as f:
        f.write(json.dumps(full, indent=2))
    return full


def _jobs(inputs: list[str], out: Path, config: FilterConfig) -> list[tuple[str, str]]:
    """(input, shard) pairs, refusing colliding shard names and outputs that are inputs."""
    names = [output_name(p) for p in inputs]
    distinct_names(inputs, names)
    jobs = [(p, str(out / n)) for p, n in zip(inputs, names, strict=True)]
    outputs = [out / "report.json", *(o for _, o in jobs)]
    if config.sample_dropped:
        outputs += [dropped_name(o) for _, o in jobs]
    refuse_overwriting_inputs(outputs, inputs)
    return jobs


def run_filter_slurm(inputs: list[str], out_dir: str, config: FilterConfig, log_dir: str = "slurm_logs",
                     max_parallel: int = 16, **slurm: Any) -> dict[str, Any]:
    """The same tasks as a Slurm job array through submitit (`pip install submitit`; not a dependency here)."""
    try:
        import submitit
    except ImportError as exc:
        raise UserError("the Slurm launcher needs submitit: `uv pip install submitit`") from exc
    out = out_folder(out_dir)
    jobs = _jobs(inputs, out, config)
    executor = submitit.AutoExecutor(folder=log_dir)
    executor.update_parameters(slurm_array_parallelism=max_parallel, **slurm)
    start = time.perf_counter()
    with executor.batch():
        futures = [executor.submit(filter_file, p, o, config) for p, o in jobs]
    reports = [f.result() for f in tqdm(submitit.helpers.as_completed(futures), total=len(futures), desc="slurm")]
    summary = summarize(reports, time.perf_counter() - start, max_parallel)
    full = {"summary": summary, "config": asdict(config), "files": sorted(reports, key=lambda r: r["input"])}
    with atomic_write(out / "report.json") as f:
        f.write(json.dumps(full, indent=2))
    return full


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable table: per step, documents seen, dropped and the share of all drops."""
    total_dropped = sum(c.get("dropped", 0) for c in summary["steps"].values()) or 1
    lines = [f"{summary['files']} files, {summary['documents_read']} documents read, "
             f"{summary['documents_kept']} kept; {summary['input_mb']:.1f} MB ({summary['text_mb']:.1f} MB of text) "
             f"in {summary['wall_seconds']:.1f} s ({summary['mb_per_second_per_worker']:.2f} MB/s per worker)",
             f"{'step':<12}{'seen':>10}{'dropped':>10}{'modified':>10}{'of drops':>10}"]
    for name, c in summary["steps"].items():
        d = c.get("dropped", 0)
        lines.append(f"{name:<12}{c.get('seen', 0):>10}{d:>10}{c.get('modified', 0):>10}{d / total_dropped:>10.1%}")
    for f in summary["failed_files"]:
        kept = " (whole records before the damage kept)" if f.get("partial") else ""
        lines.append(f"FAILED {f['input']}: {f['error']}{kept}")
    return "\n".join(lines)
