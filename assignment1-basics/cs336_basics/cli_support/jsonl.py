"""JSON Lines reading that survives a run killed mid-write."""

import json
import os
import warnings
from typing import Any

from cs336_basics.cli_support.errors import UserError


def read_jsonl_tolerant(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; a half-written last line (no newline, not valid JSON) is dropped with a warning
    naming the file. A damaged line anywhere else is a `UserError`: that is not a crash, it is corruption."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # the last line, with no newline after it
                warnings.warn(f"{os.fspath(path)}: dropped a half-written last line ({len(line)} characters)",
                              stacklevel=2)
                continue
            raise UserError(f"{os.fspath(path)} line {number} is not JSON: {e.msg}") from e
    return records
