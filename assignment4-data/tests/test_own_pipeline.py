"""WARC/WET IO under damage, the parallel filter pipeline and its report, tokenization, and the CLI end to end."""

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cs336_data.cli import main
from cs336_data.document import Document, Step
from cs336_data.pii import EMAIL_TOKEN
from cs336_data.pipeline import FilterConfig, run_filter, run_steps_safely
from cs336_data.tokenization import _byte_to_char, gpt2_encoding, tokenize_to_uint16
from cs336_data.warc_io import iter_warc_documents, write_warc_responses, write_wet

WORDS = ["river", "mountain", "garden", "library", "history", "science", "village", "morning", "teacher",
         "student", "window", "kitchen", "market", "summer", "winter", "bridge", "forest", "doctor", "letter"]


def _prose(rng, n_words=120):
    sentences, words = [], 0
    while words < n_words:
        k = rng.randrange(6, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        words += k
    return " ".join(sentences)


def _docs(seed, n=30):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            text = _prose(rng) + f" Contact writer{i}@example.org for details."
        elif kind == 1:
            text = "Too short to keep."
        else:
            text = "| $ # 12 34 % & * " * 40  # long enough, fails the alphabetic-words rule
        docs.append(Document(text=text, url=f"http://site{i}.example/", id=f"<urn:{seed}:{i}>"))
    return docs


# ---------------------------------------------------------------- WARC / WET IO


def test_wet_roundtrip(tmp_path):
    docs = [Document("naïve café ☃\nline two", url="http://a/"), Document("", url="http://b/")]
    assert write_wet(tmp_path / "x.warc.wet.gz", docs) == 2
    stats = Counter()
    back = list(iter_warc_documents(tmp_path / "x.warc.wet.gz", stats=stats))
    assert [(d.text, d.url) for d in back] == [("naïve café ☃\nline two", "http://a/"), ("", "http://b/")]
    assert back[0].id.startswith("<urn:uuid:") and stats == {"records": 2}


def test_truncated_gzip_keeps_records_before_the_damage(tmp_path):
    docs = [Document(_prose(random.Random(i), 400), url=f"http://d{i}/") for i in range(200)]
    write_wet(tmp_path / "full.wet.gz", docs)
    raw = (tmp_path / "full.wet.gz").read_bytes()
    (tmp_path / "cut.wet.gz").write_bytes(raw[: len(raw) // 2])
    stats = Counter()
    got = list(iter_warc_documents(tmp_path / "cut.wet.gz", stats=stats))
    assert 50 < len(got) < 200
    assert [d.text for d in got] == [d.text for d in docs[: len(got)]]  # every yielded record is whole
    assert stats["damaged_stream"] == 1 and stats["truncated"] == 1


def test_truncated_plain_record_and_garbage_and_empty(tmp_path):
    write_wet(tmp_path / "full.wet", [Document("first record text", url="http://1/"),
                                      Document("second record text " * 20, url="http://2/")])
    raw = (tmp_path / "full.wet").read_bytes()
    (tmp_path / "cut.wet").write_bytes(raw[:-30])
    stats = Counter()
    assert [d.url for d in iter_warc_documents(tmp_path / "cut.wet", stats=stats)] == ["http://1/"]
    assert stats == {"records": 1, "truncated": 1}
    (tmp_path / "junk.wet").write_bytes(b"this is not a WARC file at all\n" * 10)
    stats = Counter()
    assert list(iter_warc_documents(tmp_path / "junk.wet", stats=stats)) == [] and stats["invalid"] == 1
    (tmp_path / "empty.wet.gz").write_bytes(gzip.compress(b""))
    assert list(iter_warc_documents(tmp_path / "empty.wet.gz")) == []
    with pytest.raises(ValueError, match="kind"):
        list(iter_warc_documents(tmp_path / "empty.wet.gz", "metadata"))


def test_warc_responses_skip_non_html(tmp_path):
    pages = [("http://a/", "<p>Grüße aus Köln</p>".encode("cp1252"), "text/html; charset=windows-1252"),
             ("http://b/", b"\x89PNG\r\n", "image/png"), ("http://c/", b"<p>ok</p>", "text/html")]
    write_warc_responses(tmp_path / "x.warc.gz", pages)
    stats = Counter()
    docs = list(iter_warc_documents(tmp_path / "x.warc.gz", "response", stats))
    assert [d.url for d in docs] == ["http://a/", "http://c/"]
    assert docs[0].meta["html"] == pages[0][1] and stats == {"records": 3, "non_html": 1}


# ---------------------------------------------------------------- pipeline


def test_step_exception_drops_only_that_document():
    class Fragile(Step):
        name = "fragile"

        def apply(self, doc):
            if "boom" in doc.text:
                raise RuntimeError("bad document")
            return doc

    step = Fragile()
    out = list(run_steps_safely([Document("a"), Document("boom"), Document("c")], [step]))
    assert [d.text for d in out] == ["a", "c"] and step.counters["errors"] == 1


def test_filter_pipeline_parallel_report(tmp_path):
    for seed in range(2):
        write_wet(tmp_path / f"in{seed}.warc.wet.gz", _docs(seed))
    raw = (tmp_path / "in1.warc.wet.gz").read_bytes()
    (tmp_path / "cut.warc.wet.gz").write_bytes(raw[: len(raw) * 2 // 3])
    (tmp_path / "junk.warc.wet.gz").write_bytes(b"\x1f\x8b\x08garbage")
    inputs = [str(tmp_path / f) for f in ("in0.warc.wet.gz", "in1.warc.wet.gz", "cut.warc.wet.gz",
                                          "junk.warc.wet.gz")]
    config = FilterConfig(min_chars=50, lang_threshold=None, nsfw_threshold=None, sample_dropped=3)
    report = run_filter(inputs, str(tmp_path / "out"), config, workers=2, progress=False)
    summary = report["summary"]
    assert summary["files"] == 4
    # damaged inputs are failures with their reason, not "ok with fewer documents": the truncated file keeps the
    # whole records before the damage (partial), the garbage one writes no shard
    failed = {Path(f["input"]).name: f for f in summary["failed_files"]}
    assert sorted(failed) == ["cut.warc.wet.gz", "junk.warc.wet.gz"]
    assert failed["cut.warc.wet.gz"]["partial"] and "damaged compressed stream" in failed["cut.warc.wet.gz"]["error"]
    assert not failed["junk.warc.wet.gz"]["partial"] and not (tmp_path / "out" / "junk.jsonl.gz").exists()
    steps = summary["steps"]
    assert steps["min_length"]["seen"] == summary["documents_read"]
    assert steps["gopher"]["seen"] == steps["min_length"]["kept"]  # each step sees what the previous kept
    assert steps["mask_pii"]["seen"] == steps["gopher"]["kept"] == summary["documents_kept"]
    assert steps["min_length"]["dropped"] == steps["gopher"]["dropped"]  # 1/3 short, 1/3 symbols
    assert steps["mask_pii"]["emails_masked"] == summary["documents_kept"]
    assert summary["read"]["damaged_stream"] == 2 and summary["read"]["truncated"] == 1  # cut + junk gzip
    with gzip.open(tmp_path / "out" / "in0.jsonl.gz", "rt") as f:
        kept = [json.loads(line) for line in f]
    assert len(kept) == 10 and all(EMAIL_TOKEN in d["text"] and "@" not in d["text"] for d in kept)
    assert kept[0]["url"] == "http://site0.example/" and kept[0]["meta"]["pii"]["emails"] == 1
    with gzip.open(tmp_path / "out" / "dropped" / "in0.jsonl.gz", "rt") as f:
        dropped = [json.loads(line) for line in f]
    assert [d["step"] for d in dropped] == ["min_length"] * 3 + ["gopher"] * 3
    assert dropped[0]["text"] == "Too short to keep."
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["summary"]["documents_kept"] == summary["documents_kept"]
    assert summary["mb_per_second_per_worker"] > 0


# ---------------------------------------------------------------- tokenization


@pytest.fixture
def tiny_vocab(tmp_path):
    """A GPT-2-format vocab.json: the 256 byte tokens, one merge ("he"), and <|endoftext|>."""
    table = _byte_to_char()
    vocab = {table[b]: b for b in range(256)}
    vocab["he"] = 256
    vocab["<|endoftext|>"] = 257
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocab))
    return path


def test_tokenize_to_uint16(tmp_path, tiny_vocab):
    enc = gpt2_encoding(tiny_vocab)
    assert enc.encode_ordinary("hehe!") == [256, 256, 33]
    texts = ["hehe!", "é", ""]
    stats = tokenize_to_uint16(iter(texts), tmp_path / "tok.bin", enc, workers=2, progress=False)
    ids = np.fromfile(tmp_path / "tok.bin", dtype=np.uint16)
    assert ids.tolist() == [256, 256, 33, 257, 0xC3, 0xA9, 257, 257]
    assert stats == {"documents": 3, "tokens": 8}


# ---------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path, tiny_vocab, capsys, monkeypatch):
    monkeypatch.setenv("CS336_DATA_CACHE", str(tmp_path / "cache"))
    for var in ("CS336_LID_MODEL", "CS336_NSFW_MODEL", "CS336_TOXIC_MODEL"):
        monkeypatch.delenv(var, raising=False)
    write_wet(tmp_path / "a.warc.wet.gz", _docs(3))
    # a missing model stops the run at once with one line naming the download command (language ID has its
    # bundled lid.176.ftz; the harmful-content models have no bundled copy)
    assert main(["filter", str(tmp_path / "a.warc.wet.gz"), "--out-dir", str(tmp_path / "f0")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cs336-data assets download nsfw" in err

    assert main(["filter", str(tmp_path / "a.warc.wet.gz"), "--out-dir", str(tmp_path / "f"), "--no-langid",
                 "--no-harmful", "--min-chars", "50", "--no-progress"]) == 0
    assert "gopher" in capsys.readouterr().out

    shard = tmp_path / "f" / "a.jsonl.gz"
    assert main(["tokenize", str(shard), "--out", str(tmp_path / "tok.bin"), "--gpt2-vocab", str(tiny_vocab)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["documents"] == 10

    write_warc_responses(tmp_path / "p.warc.gz", [("http://x/", b"<html><p>Hello there</p></html>", "text/html")])
    assert main(["extract", str(tmp_path / "p.warc.gz"), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text())["text"] == "Hello there"
    capsys.readouterr()

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "1.txt").write_text("same line\nunique one\n")
    (docs / "2.txt").write_text("same line\nunique two\n")
    assert main(["dedup", "exact", str(docs / "1.txt"), str(docs / "2.txt"), "--out-dir", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "1.txt").read_text() == "unique one\n"
    (docs / "3.txt").write_text("same line\nunique two\n")
    assert main(["dedup", "minhash", *(str(docs / f"{i}.txt") for i in (1, 2, 3)), "--out-dir", str(tmp_path / "m"),
                 "--num-hashes", "20", "--num-bands", "10", "--ngrams", "2"]) == 0
    assert len(list((tmp_path / "m").iterdir())) == 2
    assert main(["classify", "gopher", str(docs / "1.txt")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["failed"][0] == "word_count"


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["dedup", "minhash", str(tmp_path / "x"), "--out-dir", str(tmp_path), "--num-hashes", "10",
                 "--num-bands", "3"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_a_step_that_raises_on_every_document_fails_the_file(tmp_path, monkeypatch):
    """Not "ok, 0 documents kept": the file is failed with the step's first error (and kept in step_errors)."""

    class Broken(Step):
        name = "broken"

        def apply(self, doc):
            raise RuntimeError("model file is corrupt")

    write_wet(tmp_path / "a.warc.wet.gz", _docs(0, n=4))
    monkeypatch.setattr("cs336_data.pipeline.build_steps", lambda config: [Broken()])
    report = run_filter([str(tmp_path / "a.warc.wet.gz")], str(tmp_path / "out"), FilterConfig(), progress=False)
    (failed,) = report["summary"]["failed_files"]
    assert failed["error"] == "step broken raised on all 4 documents: RuntimeError: model file is corrupt"
    assert report["files"][0]["step_errors"] == {"broken": "RuntimeError: model file is corrupt"}
