"""Exact line deduplication: keep only lines that occur exactly once across a whole corpus.

Pass 1 hashes every line (64-bit MurmurHash3 of its bytes, line ending excluded) into one NumPy array per file, so
memory is 8 bytes a line whatever the line length; sorting finds the hashes seen more than once. Pass 2 rewrites
each file (same name, in the output folder), keeping the bytes of lines whose hash is unique. Files are read as
bytes, so any encoding passes through unchanged; gzip and other formats are handled by xopen on both sides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import mmh3
import numpy as np
from tqdm import tqdm
from xopen import xopen


def _lines(path: str | os.PathLike) -> Iterator[bytes]:
    with xopen(path, "rb", threads=0) as f:
        yield from f


def _key(line: bytes) -> bytes:
    return line.rstrip(b"\r\n")


def line_hashes(path: str | os.PathLike) -> np.ndarray:
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
    paths = [Path(p) for p in input_files]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError("input files must have distinct names, since outputs keep the input file names")
    out_dir = Path(output_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes = [line_hashes(p) for p in tqdm(paths, desc="count lines", disable=not progress)]
    repeated = repeated_hashes(hashes)
    stats = {"lines": 0, "kept": 0}
    for path, h in tqdm(list(zip(paths, hashes, strict=True)), desc="rewrite", disable=not progress):
        keep = ~np.isin(h, repeated, assume_unique=False)
        with xopen(out_dir / path.name, "wb", threads=0) as out:
            for line, k in zip(_lines(path), keep, strict=True):
                if k:
                    out.write(line)
        stats["lines"] += int(h.size)
        stats["kept"] += int(keep.sum())
    return stats
