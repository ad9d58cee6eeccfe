"""Readers for the evaluation sets, each from a path the user gives (the data never lives in the repo).

Every reader returns plain dicts with the fields the evaluation needs, and fails with one line naming the
file and what is missing.
"""

import csv
import os
from pathlib import Path
from typing import Any

from cs336_alignment.answers import last_boxed
from cs336_alignment.cli_inputs import read_records
from cs336_alignment.parsing import gsm8k_gold_answer
from cs336_basics.cli_support import UserError, reading


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def _field(row: dict[str, Any], names: tuple[str, ...], path: Path, number: int) -> Any:
    for name in names:
        if name in row:
            return row[name]
    raise UserError(f"{path} example {number} has none of the fields {names}")


def load_math(path: str | os.PathLike) -> list[dict[str, Any]]:
    """MATH-style JSONL: `problem`/`question` and `answer` (or a `solution` whose last \\boxed{} is the answer)."""
    path = _require_file(path)
    examples = []
    for i, row in enumerate(read_records(path)):
        question = _field(row, ("problem", "question", "prompt"), path, i)
        if "answer" in row:
            answer = str(row["answer"])
        else:
            answer = last_boxed(str(_field(row, ("solution",), path, i)))
            if answer is None:
                raise UserError(f"{path} example {i} has no answer field and no \\boxed{{}} in its solution")
        examples.append({"question": question, "answer": answer, "source": row})
    return examples


def load_gsm8k(path: str | os.PathLike) -> list[dict[str, Any]]:
    """GSM8K JSONL: `question` and `answer` ending in "#### <number>"."""
    path = _require_file(path)
    examples = []
    for i, row in enumerate(read_records(path)):
        question = _field(row, ("question",), path, i)
        try:
            gold = gsm8k_gold_answer(str(_field(row, ("answer",), path, i)))
        except UserError:
            raise
        except ValueError as e:
            raise UserError(f"{path} example {i}: {e}") from None
        examples.append({"question": question, "answer": gold})
    return examples


def _subject_from_filename(name: str) -> str:
    stem = Path(name).stem
    for suffix in ("_test", "_dev", "_val"):
        stem = stem.removesuffix(suffix)
    return stem.replace("_", " ")


def load_mmlu(path: str | os.PathLike) -> list[dict[str, Any]]:
    """MMLU CSVs without header (question, four options, answer letter): one file, or every *.csv in a folder.

    The subject comes from the file name ("college_physics_test.csv" -> "college physics").
    """
    path = _require_file(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path} holds no .csv files")
    examples = []
    for file in files:
        with reading(file), open(file, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if len(row) != 6:
                    raise UserError(f"{file}:{number}: expected 6 columns (question, A-D, answer), got {len(row)}")
                answer = row[5].strip().upper()
                if answer not in ("A", "B", "C", "D"):
                    raise UserError(f"{file}:{number}: answer {row[5]!r} is not one of A-D")
                examples.append({
                    "subject": _subject_from_filename(file.name), "question": row[0], "options": row[1:5],
                    "answer": answer,
                })
    return examples


def load_instructions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """AlpacaEval-style JSONL (or a JSON array) with `instruction` (and `dataset`) per example."""
    import json

    path = _require_file(path)
    with reading(path):
        text = path.read_text(encoding="utf-8").lstrip()
        rows = json.loads(text) if text.startswith("[") else read_records(path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path} example {i} is not a JSON object")
        _field(row, ("instruction",), path, i)
    return rows


def load_safety_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """SimpleSafetyTests-style CSV with a header and a `prompts_final` column (JSONL with that field also works)."""
    path = _require_file(path)
    if path.suffix == ".jsonl":
        rows = read_records(path)
    else:
        with reading(path), open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        _field(row, ("prompts_final",), path, i)
    return rows
