"""Generate for every example, grade each completion, write per-example JSONL and a summary table."""

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cs336_alignment.generation import GenerationBackend, SamplingParams
from cs336_basics.cli_support import UserError, atomic_write

Grader = Callable[[dict[str, Any], str], dict[str, Any]]


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Whole or not at all: a failure leaves an earlier file in place."""
    with atomic_write(path, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


NOT_METRICS = ("index", "sample", "num_tokens")


def mean_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric or boolean field the grader produced (e.g. accuracy, rewards, parse failures)."""
    if not records:
        return {}
    keys = [k for k, v in records[0].items() if isinstance(v, bool | int | float) and k not in NOT_METRICS]
    return {k: sum(float(r[k]) for r in records) / len(records) for k in keys}


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key, value in summary.items():
        if isinstance(value, dict):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def evaluate(
    task: str,
    examples: Sequence[dict[str, Any]],
    prompts: Sequence[str],
    grade: Grader,
    backend: GenerationBackend,
    params: SamplingParams,
    out_dir: str | os.PathLike,
    record_fields: Callable[[dict[str, Any]], dict[str, Any]] = lambda ex: {},
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs one evaluation; writes `<task>_results.jsonl`, `<task>_summary.json` and `<task>_summary.md`."""
    if len(examples) != len(prompts):
        raise ValueError(f"{len(examples)} examples but {len(prompts)} prompts")
    if not examples:
        raise UserError(f"no examples to evaluate for {task}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    completions = backend.generate(list(prompts), params)
    seconds = time.perf_counter() - start
    samples_seen: dict[int, int] = {}
    records = []
    for completion in completions:
        i = completion.prompt_index
        sample = samples_seen.get(i, 0)
        samples_seen[i] = sample + 1
        records.append({
            "index": i, "sample": sample, **record_fields(examples[i]), "prompt": prompts[i],
            "response": completion.text, "finish_reason": completion.finish_reason,
            "num_tokens": len(completion.token_ids), **grade(examples[i], completion.text),
        })
    summary: dict[str, Any] = {
        "task": task, "examples": len(examples), "samples": len(records),
        "generation_seconds": round(seconds, 3), "examples_per_second": len(examples) / max(seconds, 1e-9),
        "mean_response_tokens": sum(r["num_tokens"] for r in records) / len(records),
        **mean_metrics(records),
    }
    write_outputs(out, task, summary, records)
    return summary, records


def write_outputs(
    out_dir: str | os.PathLike, task: str, summary: dict[str, Any], records: Sequence[dict[str, Any]] | None = None
) -> None:
    """(Re)writes the per-example JSONL (when given) and the summary as JSON and as a markdown table."""
    out = Path(out_dir)
    if records is not None:
        write_jsonl(out / f"{task}_results.jsonl", records)
    with atomic_write(out / f"{task}_summary.json", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    with atomic_write(out / f"{task}_summary.md", encoding="utf-8") as f:
        f.write(markdown_table(summary) + "\n")
