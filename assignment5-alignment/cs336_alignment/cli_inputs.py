"""What `cs336-align` checks about the files it is given before it spends minutes loading a model: data files
that are JSONL objects with the needed fields, model flags that point at a model, and loading failures turned
into one line naming the path (the boundary is `cs336_basics.cli_support.run_command`)."""

import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cs336_basics.cli_support import UserError, reading


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """`path` as a string, or a `UserError` if it is missing or a folder."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; expected a {what}")
    return path


def read_records(path: str | os.PathLike, fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every line of a JSONL file as a JSON object holding `fields`; a missing, empty, damaged or wrongly shaped
    file is a `UserError` naming it (and the line)."""
    path = require_file(path, "JSONL file")
    rows = []
    with reading(path), open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [name for name in fields if name not in row]
            if missing:
                raise UserError(f"{path}:{number} lacks field(s) {missing}")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no records")
    return rows


def check_checkpoint_file(path: str | os.PathLike, what: str) -> None:
    """A checkpoint must be a non-empty torch zip archive (what `torch.save` writes); anything else would fail
    deep in `torch.load` with a message about `weights_only`."""
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise UserError(f"{what}: {path} is empty")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{what}: {path} is not a PyTorch checkpoint (not a zip archive; truncated or foreign?)")


def _require_folder(flag: str, path: str, needs: tuple[str, ...]) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path} is not a folder")
    for name in needs:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"{flag} {path} has no {name}")
        if os.path.getsize(file) == 0:
            raise UserError(f"{flag} {path}: {name} is empty")


def check_model_flags(model: str | None, basics_run: str | None, basics_tokenizer: str | None,
                      flag: str = "--model") -> None:
    """Cheap checks of the model flags (run before data loading and model loading)."""
    if model:
        _require_folder(flag, model, ("config.json",))
    elif basics_run and basics_tokenizer:
        _require_folder("--basics-run", basics_run, ("checkpoint.pt",))
        check_checkpoint_file(os.path.join(basics_run, "checkpoint.pt"), "--basics-run")
        _require_folder("--basics-tokenizer", basics_tokenizer, ("vocab.json", "merges.txt"))
    else:
        raise UserError("give --model DIR, or --basics-run DIR with --basics-tokenizer DIR")


@contextmanager
def loading(what: str) -> Iterator[None]:
    """Loading a model or checkpoint from the user's files: what goes wrong there (a damaged or foreign file, a
    folder that is not a model) is the files' fault, so it becomes one line naming `what`."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError, RuntimeError, KeyError, EOFError) as e:
        text = str(e).strip().splitlines()
        reason = text[0] if text else type(e).__name__
        raise UserError(f"cannot load {what}: {reason}") from e


def model_label(model: str | None, basics_run: str | None) -> str:
    return f"--model {model}" if model else f"--basics-run {basics_run}"


@contextmanager
def values_checked_downstream(what: str) -> Iterator[None]:
    """Generation and tokenization check what they are given with plain `ValueError`s (a prompt longer than the
    model's context, sampling settings a backend rejects): there they describe the user's data or flags, so they
    become one line. Other exceptions (IndexError, TypeError, ...) keep their traceback: those are bugs."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        text = str(e).strip().splitlines()
        raise UserError(f"{what}: {text[0] if text else type(e).__name__}") from e
