"""Document collections that can be streamed in order and read back by index, without holding texts in memory.

`FileCorpus` is one document per file (the course's dedup layout); `JsonlCorpus` is one JSON object per line
across shards (the pipeline's output), indexed by byte offsets so a document can be re-read on demand.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from xopen import xopen


class FileCorpus:
    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def text(self, i: int) -> str:
        with xopen(self.paths[i], "rb", threads=0) as f:
            return f.read().decode("utf-8", errors="replace")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self.text(i)

    def write_kept(self, keep: np.ndarray, output_directory: str | os.PathLike) -> int:
        """Copy the kept files byte for byte into the output folder under their own names."""
        out = Path(output_directory)
        out.mkdir(parents=True, exist_ok=True)
        names = [p.name for p in self.paths]
        if len(set(names)) != len(names):
            raise ValueError("input files must have distinct names, since outputs keep the input file names")
        for path, k in zip(self.paths, keep, strict=True):
            if k:
                shutil.copyfile(path, out / path.name)
        return int(np.sum(keep))


COMPRESSED = (".gz", ".zst", ".bz2", ".xz")


class JsonlCorpus:
    """JSONL shards with the text under `field`; compressed shards are first expanded into a scratch folder,
    since re-reading one document needs a seek. Outputs keep each shard's name and compression."""

    def __init__(self, paths: Sequence[str | os.PathLike], field: str = "text") -> None:
        self.sources = [Path(p) for p in paths]
        self.field = field
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.paths = []
        for i, path in enumerate(self.sources):
            if path.suffix in COMPRESSED:
                if self._scratch is None:
                    self._scratch = tempfile.TemporaryDirectory(prefix="jsonl_corpus_")
                plain = Path(self._scratch.name) / f"{i}.jsonl"
                with xopen(path, "rb", threads=0) as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                self.paths.append(plain)
            else:
                self.paths.append(path)
        shard, offset = [], []
        for s, path in enumerate(self.paths):
            pos = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        shard.append(s)
                        offset.append(pos)
                    pos += len(line)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.shard.size)

    def text(self, i: int) -> str:
        with open(self.paths[self.shard[i]], "rb") as f:
            f.seek(int(self.offset[i]))
            return json.loads(f.readline())[self.field]

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)[self.field]

    def write_kept(self, keep: np.ndarray, output_directory: str | os.PathLike) -> int:
        """Rewrite each shard under its own name keeping only the kept lines."""
        out = Path(output_directory)
        out.mkdir(parents=True, exist_ok=True)
        i = 0
        for path, source in zip(self.paths, self.sources, strict=True):
            with open(path, "rb") as f, xopen(out / source.name, "wb", threads=0) as w:
                for line in f:
                    if line.strip():
                        if keep[i]:
                            w.write(line)
                        i += 1
        return int(np.sum(keep))
