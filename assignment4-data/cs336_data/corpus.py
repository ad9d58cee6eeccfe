"""Document collections that can be streamed in order and read back by index, without holding texts in memory.

`FileCorpus` is one document per file (the course's dedup layout); `JsonlCorpus` is one JSON object per line
across shards (the pipeline's output), indexed by byte offsets so a document can be re-read on demand.
Both write their survivors beside the destinations and rename them into place together once all are written,
and refuse an output folder whose files would be the inputs themselves.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from xopen import xopen

from cs336_basics.cli_support import reading
from cs336_data.safe_io import atomic_outputs, distinct_names, jsonl_field, out_folder, require_files


class FileCorpus:
    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = require_files(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def text(self, i: int) -> str:
        with reading(self.paths[i]), xopen(self.paths[i], "rb", threads=0) as f:
            return f.read().decode("utf-8", errors="replace")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self.text(i)

    def write_kept(self, keep: np.ndarray, output_directory: str | os.PathLike) -> int:
        """Copy the kept files byte for byte into the output folder under their own names."""
        distinct_names(self.paths)
        out = out_folder(output_directory)
        kept = [p for p, k in zip(self.paths, keep, strict=True) if k]
        with atomic_outputs([out / p.name for p in kept], self.paths) as temporaries:
            for path, tmp in zip(kept, temporaries, strict=True):
                shutil.copyfile(path, tmp)
        return int(np.sum(keep))


COMPRESSED = (".gz", ".zst", ".bz2", ".xz")


class JsonlCorpus:
    """JSONL shards with the text under `field`; compressed shards are first expanded into a scratch folder,
    since re-reading one document needs a seek. Outputs keep each shard's name and compression."""

    def __init__(self, paths: Sequence[str | os.PathLike], field: str = "text") -> None:
        self.sources = require_files(paths)
        self.field = field
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.paths = []
        for i, path in enumerate(self.sources):
            if path.suffix in COMPRESSED:
                if self._scratch is None:
                    self._scratch = tempfile.TemporaryDirectory(prefix="jsonl_corpus_")
                plain = Path(self._scratch.name) / f"{i}.jsonl"
                with reading(path), xopen(path, "rb", threads=0) as src, open(plain, "wb") as dst:
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
        s = int(self.shard[i])
        with open(self.paths[s], "rb") as f:
            f.seek(int(self.offset[i]))
            return jsonl_field(f.readline(), self.sources[s], f"at byte {int(self.offset[i])}", self.field)

    def __iter__(self) -> Iterator[str]:
        for path, source in zip(self.paths, self.sources, strict=True):
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        yield jsonl_field(line, source, lineno, self.field)

    def write_kept(self, keep: np.ndarray, output_directory: str | os.PathLike) -> int:
        """Rewrite each shard under its own name keeping only the kept lines."""
        distinct_names(self.sources)
        out = out_folder(output_directory)
        with atomic_outputs([out / s.name for s in self.sources], self.sources) as temporaries:
            return self._write(keep, temporaries)

    def _write(self, keep: np.ndarray, destinations: list[str]) -> int:
        i = 0
        for path, destination in zip(self.paths, destinations, strict=True):
            with open(path, "rb") as f, xopen(destination, "wb", threads=0) as w:
                for line in f:
                    if line.strip():
                        if keep[i]:
                            w.write(line)
                        i += 1
        return int(np.sum(keep))
