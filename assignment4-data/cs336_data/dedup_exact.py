"""Exact line deduplication: keep only lines that occur exactly once across a whole corpus.

Pass 1 hashes every line (64-bit MurmurHash3 of its bytes, line ending excluded) into one NumPy array per file, so
memory is 8 bytes a line whatever the line length; sorting finds the hashes seen more than once. Pass 2 rewrites
each file (same name, in the output folder), keeping the bytes of lines whose hash is unique. Files are read as
bytes, so any encoding passes through unchanged; gzip and other formats are handled by xopen on both sides.

JSONL inputs (any name containing `.jsonl`, as `cs336-data filter` writes them) are deduplicated by the lines of
each record's `text`, not by their JSON lines (which differ by id and url): each record is rewritten with the
kept lines, and a record left without text is dropped (counted in `documents_emptied`).

Every input is read whole in pass 1, so a damaged one fails the command before anything is written; the outputs
are written beside their destinations and renamed into place together at the end, and an output that is an input
(output folder = input folder) is refused: pass 2 would otherwise truncate the file it is reading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import mmh3
import numpy as np
from tqdm import tqdm
from xopen import xopen

from cs336_basics.cli_support import UserError, reading
from cs336_data.safe_io import atomic_outputs, distinct_names, jsonl_record, out_folder, require_files

_LINE = re.compile(r"[^\n]*\n|[^\n]+")


def _is_jsonl(path: str | os.PathLike) -> bool:
    return ".jsonl" in Path(path).name


def _records(path: str | os.PathLike) -> Iterator[dict]:
    with xopen(path, "rt", threads=0, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield jsonl_record(line, path, lineno)


def _lines(path: str | os.PathLike) -> Iterator[bytes]:
    """The lines to deduplicate: of the file, or of each JSONL record's text (UTF-8), in order."""
    if _is_jsonl(path):
        for record in _records(path):
            yield from (ln.encode("utf-8", "surrogatepass") for ln in _LINE.findall(record["text"]))
        return
    with xopen(path, "rb", threads=0) as f:
        yield from f


def _key(line: bytes) -> bytes:
    return line.rstrip(b"\r\n")


def line_hashes(path: str | os.PathLike) -> np.ndarray:
    """64-bit hash of each line; a damaged input (truncated gzip, not gzip) is a `UserError` naming it."""
    with reading(path):
        return np.fromiter((mmh3.hash64(_key(ln), signed=False)[0] for ln in _lines(path)), dtype=np.uint64)


def repeated_hashes(hash_arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Sorted unique hashes that occur more than once across all arrays."""
    arrays = list(hash_arrays)
    if not arrays:
        return np.empty(0, dtype=np.uint64)
    allh = np.sort(np.concatenate(arrays))
    if allh.size < 2:
        return np.empty(0, dtype=np.uint64)
    dup = allh[1:] == allh[:-1]
    return np.unique(allh[1:][dup])


def exact_line_deduplicate(input_files: Iterable[str | os.PathLike], output_directory: str | os.PathLike,
                           progress: bool = False) -> dict[str, int]:
    """Rewrite each input into `output_directory` without its corpus-repeated lines; returns line counts."""
    paths = require_files(input_files)
    distinct_names(paths)
    out_dir = out_folder(output_directory)
    destinations = [out_dir / p.name for p in paths]
    with atomic_outputs(destinations, paths) as temporaries:
        hashes = [line_hashes(p) for p in tqdm(paths, desc="count lines", disable=not progress)]
        repeated = repeated_hashes(hashes)
        stats = {"lines": 0, "kept": 0}
        if any(_is_jsonl(p) for p in paths):
            stats["documents_emptied"] = 0
        for path, h, tmp in tqdm(list(zip(paths, hashes, temporaries, strict=True)), desc="rewrite",
                                 disable=not progress):
            keep = ~np.isin(h, repeated, assume_unique=False)
            if _is_jsonl(path):
                stats["documents_emptied"] += _rewrite_jsonl(path, keep, tmp)
            else:
                _rewrite(path, keep, tmp)
            stats["lines"] += int(h.size)
            stats["kept"] += int(keep.sum())
    return stats


def _rewrite(path: Path, keep: np.ndarray, destination: str) -> None:
    """Copy the kept lines; an input whose line count changed since pass 1 (edited meanwhile) is an error."""
    n = 0
    with xopen(destination, "wb", threads=0) as out, reading(path):
        for n, line in enumerate(_lines(path), start=1):
            if n > keep.size:
                break
            if keep[n - 1]:
                out.write(line)
    if n != keep.size:
        raise UserError(f"{path} changed while being deduplicated ({keep.size} lines counted, {n} read back)")


def _rewrite_jsonl(path: Path, keep: np.ndarray, destination: str) -> int:
    """Rewrite each record with the kept lines of its text; returns how many records were left empty (dropped)."""
    i = emptied = 0
    with xopen(destination, "wt", threads=0, encoding="utf-8") as out, reading(path):
        for record in _records(path):
            lines = _LINE.findall(record["text"])
            if i + len(lines) > keep.size:
                break
            text = "".join(ln for ln, k in zip(lines, keep[i : i + len(lines)], strict=True) if k)
            i += len(lines)
            if not text.strip():
                emptied += 1
                continue
            out.write(json.dumps({**record, "text": text}, ensure_ascii=False) + "\n")
    if i != keep.size:
        raise UserError(f"{path} changed while being deduplicated")
    return emptied
