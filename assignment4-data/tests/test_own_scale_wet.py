"""benchmarks/scale_wet.py: a `<|endoftext|>`-separated corpus becomes gzip WET shards that the pipeline reads back
document for document."""

import importlib.util
import json
from pathlib import Path

from cs336_data.warc_io import iter_warc_documents

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_wet.py"


def test_corpus_to_wet_shards_round_trip(tmp_path):
    spec = importlib.util.spec_from_file_location("scale_wet", BENCH)
    scale_wet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale_wet)
    docs = [f"Document {i} über the river, {i * 7} stones.\nSecond line of {i}." for i in range(300)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(d + "\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    # small read blocks, so documents and the separator straddle blocks
    assert list(scale_wet.iter_documents(str(corpus), block_chars=97)) == docs
    summary = scale_wet.write_shards(str(corpus), str(tmp_path / "wet"), total_bytes=10**9, shard_bytes=4000)
    assert summary["documents"] == 300 and len(summary["shards"]) > 3
    read = [d.text for s in summary["shards"] for d in iter_warc_documents(s["path"])]
    assert read == docs
    assert all(s["path"].endswith(".warc.wet.gz") and Path(s["path"]).read_bytes()[:2] == b"\x1f\x8b"
               for s in summary["shards"])
    assert all(s["text_bytes"] < 4000 + 100 for s in summary["shards"])
    # a size limit stops early at a document end
    part = scale_wet.write_shards(str(corpus), str(tmp_path / "wet2"), total_bytes=5000, shard_bytes=4000)
    assert 5000 <= part["text_bytes"] < 5100 and json.dumps(part)
