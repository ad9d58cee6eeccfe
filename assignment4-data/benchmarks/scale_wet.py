"""WET files built from the generated scale corpus, for measuring `cs336-data filter` at Common Crawl size.

    uv run python assignment1-basics/benchmarks/scale_corpus.py --out /tmp/scale/corpus_2.1g.txt --gb 2.1
    uv run python assignment4-data/benchmarks/scale_wet.py --corpus /tmp/scale/corpus_2.1g.txt \
        --out-dir /tmp/scale/wet --gb 1 --shard-mb 125

Reads the corpus (documents separated by `<|endoftext|>`) as a stream and writes its first `--gb` GB of document
text as gzip WET `conversion` records, one per document (URL `http://scale.example/<shard>/<n>`), cut into shards
of about `--shard-mb` MB of text (`scale-00000.warc.wet.gz`, ...), as Common Crawl splits a crawl into many WET
files (about 400 MB of text each there). Memory is one read block and one document.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator

from cs336_data.document import Document
from cs336_data.warc_io import write_wet

EOT = "<|endoftext|>"


def iter_documents(path: str, block_chars: int = 1 << 22) -> Iterator[str]:
    """The documents of a `<|endoftext|>`-separated UTF-8 file, stripped, read in blocks."""
    carry = ""
    with open(path, encoding="utf-8") as f:
        while block := f.read(block_chars):
            parts = (carry + block).split(EOT)
            carry = parts.pop()
            for part in parts:
                if part.strip():
                    yield part.strip()
    if carry.strip():
        yield carry.strip()


def write_shards(corpus: str, out_dir: str, total_bytes: int, shard_bytes: int, prefix: str = "scale") -> dict:
    os.makedirs(out_dir, exist_ok=True)
    docs = iter_documents(corpus)
    shards, text_bytes, n_docs = [], 0, 0
    start = time.perf_counter()
    while text_bytes < total_bytes:
        shard = len(shards)
        path = os.path.join(out_dir, f"{prefix}-{shard:05d}.warc.wet.gz")
        state = {"bytes": 0, "docs": 0, "done": False}

        def take(shard: int = shard, state: dict = state, so_far: int = text_bytes) -> Iterator[Document]:
            for text in docs:
                size = len(text.encode("utf-8"))
                state["bytes"] += size
                yield Document(text, id=f"scale-{shard}-{state['docs']}",
                               url=f"http://scale.example/{shard}/{state['docs']}")
                state["docs"] += 1
                if state["bytes"] >= shard_bytes or so_far + state["bytes"] >= total_bytes:
                    return
            state["done"] = True

        partial = os.path.join(out_dir, f".{prefix}-{shard:05d}.part.warc.wet.gz")  # .gz: compressed as written
        write_wet(partial, take())
        os.replace(partial, path)
        shards.append({"path": path, "text_bytes": state["bytes"], "documents": state["docs"],
                       "file_bytes": os.path.getsize(path)})
        text_bytes += state["bytes"]
        n_docs += state["docs"]
        if state["done"]:
            break
    return {"corpus": corpus, "shards": shards, "text_bytes": text_bytes, "documents": n_docs,
            "file_bytes": sum(s["file_bytes"] for s in shards), "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--gb", type=float, default=1.0, help="GB (1e9 bytes) of document text in all")
    p.add_argument("--shard-mb", type=float, default=125.0, help="MB of document text per WET file")
    args = p.parse_args(argv)
    summary = write_shards(args.corpus, args.out_dir, int(args.gb * 1e9), int(args.shard_mb * 1e6))
    with open(os.path.join(args.out_dir, "shards.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "shards"} | {"files": len(summary["shards"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
