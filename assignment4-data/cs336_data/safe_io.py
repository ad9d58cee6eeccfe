"""How every `cs336-data` command reads its inputs and writes its outputs, on top of `cs336_basics.cli_support`:
inputs checked before anything is written, outputs renamed into place together only when the command succeeds,
and JSONL records that lack their text reported with the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from cs336_basics.cli_support import UserError, atomic_path, check_output, refuse_overwriting_inputs

PathLike = str | os.PathLike


def require_files(paths: Iterable[PathLike]) -> list[Path]:
    """Every input exists and is a file, checked before any output is touched (one line naming the first bad one)."""
    checked = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"input not found: {path}")
        if path.is_dir():
            raise UserError(f"input {path} is a folder; expected a file")
        checked.append(path)
    return checked


def out_folder(path: PathLike, flag: str = "--out-dir") -> Path:
    """The output folder, created if needed; an existing file there (or above it) is refused rather than a
    FileExistsError or NotADirectoryError."""
    check_output(path, flag, folder=True)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def out_file(path: PathLike, flag: str = "--out") -> Path:
    """An output file's path, checked before any work: not a folder, and not below a file (atomic_path would
    fail only when writing, with "File exists: <the file>")."""
    check_output(path, flag)
    return Path(path)


@contextmanager
def atomic_outputs(destinations: Sequence[PathLike], inputs: Iterable[PathLike] = ()) -> Iterator[list[str]]:
    """Temporary paths beside each destination (same extension, so xopen picks the same compression); all are
    renamed into place when the block succeeds, none when it fails. An output that is an input is refused first."""
    refuse_overwriting_inputs(destinations, inputs)
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(d)) for d in destinations]


def distinct_names(paths: Sequence[PathLike], output_names: Sequence[str] | None = None) -> None:
    """Outputs named after their inputs must not collide: two inputs writing one output would merge or lose data."""
    names = output_names if output_names is not None else [Path(p).name for p in paths]
    seen: dict[str, PathLike] = {}
    for path, name in zip(paths, names, strict=True):
        if name in seen:
            raise UserError(f"inputs {seen[name]} and {path} would both write {name}; give inputs distinct names")
        seen[name] = path


def jsonl_record(line: bytes | str, path: PathLike, lineno: int | str, field: str = "text") -> dict[str, Any]:
    """One JSONL record holding a string under `field`; a record that is not JSON, not an object or lacks the
    field is a `UserError` naming the file and line (a KeyError deep inside a pipeline says neither)."""
    where = f"{os.fspath(path)} line {lineno}"
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8") from e
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, expected an object with {field!r}")
    if field not in record:
        raise UserError(f"{where} has no {field!r} field (keys: {', '.join(map(str, record)) or 'none'})")
    if not isinstance(record[field], str):
        raise UserError(f"{where}: {field!r} is a {type(record[field]).__name__}, expected a string")
    return record


def jsonl_field(line: bytes | str, path: PathLike, lineno: int | str, field: str = "text") -> str:
    """The `field` string of one JSONL record (see `jsonl_record`)."""
    return jsonl_record(line, path, lineno, field)[field]
