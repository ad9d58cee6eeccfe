"""`cs336-data` keeps the user's files safe, rejects bad values and fails in one line: the real CLI, in
subprocesses, fed a family of bad inputs (missing, empty, a folder, truncated gzip, not gzip, garbage bytes,
JSONL of the wrong shape). Every failure must be exit 2 with exactly one stderr line `cs336-data: error: ...`
and no traceback, and every destination that existed before must be byte-identical afterwards."""

import gzip
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cs336_data.document import Document
from cs336_data.tokenization import _byte_to_char
from cs336_data.warc_io import write_warc_responses, write_wet

README = Path(__file__).resolve().parents[1] / "README.md"
PRECIOUS = b"an earlier result the user wants to keep\n"
WORDS = ["river", "mountain", "garden", "library", "history", "science", "village", "morning", "teacher",
         "student", "window", "kitchen"]


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CS336_")}
    env["CS336_DATA_CACHE"] = str(cwd / "no_cache")
    return subprocess.run([sys.executable, "-m", "cs336_data", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("cs336-data: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _prose(i: int, n_words: int = 80) -> str:
    words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(n_words)]
    return " ".join(words).capitalize() + f". Page {i} ends here."


def _wet(path: Path, n: int = 6, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wet(path, [Document(_prose(i), url=f"http://site{i}.example/") for i in range(start, start + n)])
    return path


def _gzip_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    return path


@pytest.fixture
def vocab(tmp_path: Path) -> Path:
    """A GPT-2-format vocab.json: the 256 byte tokens and <|endoftext|>."""
    table = _byte_to_char()
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({**{table[b]: b for b in range(256)}, "<|endoftext|>": 256}))
    return path


def bad_inputs(folder: Path, suffix: str) -> dict[str, Path]:
    """One file of each bad kind, named with `suffix` (`.gz` ones get `.gz`), none of them usable."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = gzip.compress(b'{"text": "a whole line of text"}\n' * 400)
    made = {
        "missing": folder / f"missing{suffix}",
        "empty": folder / f"empty{suffix}",
        "directory": folder / f"folder{suffix}",
        "truncated_gzip": folder / f"cut{suffix}.gz",
        "not_gzip": folder / f"plain{suffix}.gz",
        "garbage": folder / f"garbage{suffix}",
        "wrong_jsonl": folder / f"shape{suffix}",
    }
    made["empty"].write_bytes(b"")
    made["directory"].mkdir()
    made["truncated_gzip"].write_bytes(whole[: len(whole) // 2])
    made["not_gzip"].write_bytes(b"this was never compressed\n")
    made["garbage"].write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 3000, dtype=np.uint8)))
    made["wrong_jsonl"].write_text('{"nottext": 1}\n[1, 2]\n')
    return made


def check_family(tmp_path: Path, families: list[str], suffix: str, make_args) -> None:
    """For each bad input kind: one-line exit 2 naming the bad file, and the destinations `make_args` names stay
    byte-identical with no temporary left beside them."""
    bad = bad_inputs(tmp_path / "bad", suffix)

    def one(family: str) -> None:
        args, destinations = make_args(bad[family], tmp_path / f"out_{family}")
        for d in destinations:
            d.parent.mkdir(parents=True, exist_ok=True)
            d.write_bytes(PRECIOUS)
        r = cli(tmp_path, *args)
        assert_one_line_error(r, bad[family].name)
        for d in destinations:
            assert d.read_bytes() == PRECIOUS, (family, d)
            assert [p.name for p in d.parent.iterdir()] == [d.name], (family, "temporary left behind")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, families))


ALL = ["missing", "empty", "directory", "truncated_gzip", "not_gzip", "garbage", "wrong_jsonl"]


def test_extract_bad_inputs(tmp_path):
    check_family(tmp_path, ALL, ".warc", lambda bad, out: (["extract", bad, "--out", out / "keep.jsonl"],
                                                           [out / "keep.jsonl"]))


def test_dedup_exact_bad_inputs_leave_every_output_alone(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("one\ntwo\n")

    def args(bad, out):
        return ["dedup", "exact", good, bad, "--out-dir", out], [out / "good.txt"]

    # an empty or binary text file is a valid input for line dedup (bytes in, bytes out); missing and folder
    # inputs go through the same check as extract's
    check_family(tmp_path, ["truncated_gzip", "not_gzip", "wrong_jsonl"], ".jsonl", args)


def test_dedup_minhash_jsonl_bad_inputs(tmp_path):
    good = _gzip_jsonl(tmp_path / "good.jsonl.gz", ["some words here", "other words there"])

    def args(bad, out):
        return (["dedup", "minhash", good, bad, "--jsonl", "--out-dir", out, "--num-hashes", "4", "--num-bands",
                 "2"], [out / "good.jsonl.gz"])

    check_family(tmp_path, ["truncated_gzip", "garbage", "wrong_jsonl"], ".jsonl", args)


def test_tokenize_bad_inputs(tmp_path, vocab):
    def args(bad, out):
        return ["tokenize", bad, "--out", out / "tokens.bin", "--gpt2-vocab", vocab], [out / "tokens.bin"]

    check_family(tmp_path, ["directory", "empty", "not_gzip", "garbage", "wrong_jsonl"], ".jsonl", args)
    r = cli(tmp_path, "tokenize", _gzip_jsonl(tmp_path / "ok.jsonl.gz", ["hi"]), "--out", "t.bin",
            "--gpt2-vocab", tmp_path / "ok.jsonl.gz")  # not a vocab at all
    assert_one_line_error(r, "ok.jsonl.gz")


def test_quality_commands_bad_inputs(tmp_path):
    check_family(tmp_path, ["missing", "truncated_gzip"], ".txt",
                 lambda bad, out: (["quality", "sample-urls", "--urls", bad, "--out", out / "urls.txt"],
                                   [out / "urls.txt"]))
    negatives = _wet(tmp_path / "neg.warc.wet.gz")
    check_family(tmp_path / "train", ["empty", "truncated_gzip"], ".warc.wet",
                 lambda bad, out: (["quality", "train", "--positives", bad, "--negatives", negatives, "--no-filter",
                                    "--out", out / "model.bin", "--work-dir", tmp_path / "work"],
                                   [out / "model.bin"]))


def test_classify_bad_inputs(tmp_path):
    check_family(tmp_path, ["missing", "directory"], ".txt", lambda bad, out: (["classify", "gopher", bad], []))


def test_error_messages_say_what_is_wrong(tmp_path):
    shard = tmp_path / "shard.jsonl"
    shard.write_text('{"text": "fine"}\n{"id": 3}\n')
    assert_one_line_error(cli(tmp_path, "dedup", "minhash", shard, "--out-dir", "o"), "shard.jsonl line 2",
                          "no 'text' field (keys: id)")
    assert_one_line_error(cli(tmp_path, "filter", shard, "--no-langid", "--no-harmful", "--out-dir", shard),
                          "--out-dir", "is a file")


# ---------------------------------------------------------------- class 1: outputs never over inputs


def test_output_that_is_an_input_is_refused_before_anything_is_written(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "x.txt").write_text("same\nsame\nunique\n")
    before = (docs / "x.txt").read_bytes()
    # this used to empty x.txt, then fail with "zip() argument 2 is longer than argument 1"
    assert_one_line_error(cli(tmp_path, "dedup", "exact", "docs/x.txt", "--out-dir", "docs"), "would overwrite")
    assert_one_line_error(cli(tmp_path, "dedup", "minhash", "docs/x.txt", "--out-dir", docs.resolve()),
                          "would overwrite")
    assert (docs / "x.txt").read_bytes() == before
    wet = _wet(tmp_path / "a.warc.wet.gz")
    wet_bytes = wet.read_bytes()
    assert_one_line_error(cli(tmp_path, "extract", wet, "--out", "./a.warc.wet.gz"), "would overwrite")
    assert_one_line_error(cli(tmp_path, "tokenize", wet, "--out", wet), "would overwrite")
    assert wet.read_bytes() == wet_bytes
    # filter's shard of a.warc.wet.gz is f/a.jsonl.gz: here a link to the input itself
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.jsonl.gz").symlink_to(wet)
    assert_one_line_error(cli(tmp_path, "filter", wet, "--out-dir", "f", "--no-langid", "--no-harmful"),
                          "would overwrite")
    assert wet.read_bytes() == wet_bytes and not (tmp_path / "f" / "report.json").exists()


def test_inputs_whose_outputs_collide_are_refused(tmp_path):
    for sub in ("a", "b"):
        _wet(tmp_path / sub / "x.warc.wet.gz")
    r = cli(tmp_path, "filter", "a/x.warc.wet.gz", "b/x.warc.wet.gz", "--out-dir", "f", "--no-langid",
            "--no-harmful")
    assert_one_line_error(r, "would both write x.jsonl.gz")
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())


# ---------------------------------------------------------------- class 2: numeric options


@pytest.mark.parametrize("args, flag", [
    (["dedup", "minhash", "x.txt", "--out-dir", "o", "--threshold", "0"], "--threshold"),
    (["dedup", "minhash", "x.txt", "--out-dir", "o", "--threshold", "nan"], "--threshold"),
    (["dedup", "minhash", "x.txt", "--out-dir", "o", "--num-hashes", "10", "--num-bands", "3"], "--num-bands"),
    (["filter", "x.txt", "--out-dir", "o", "--lang-threshold", "1.5"], "--lang-threshold"),
    (["tokenize", "x.txt", "--out", "t.bin", "--workers", "-2"], "--workers"),
    (["classify", "gopher", "x.txt", "-k", "0"], "--k"),
])
def test_bad_numbers_are_refused_naming_the_flag(tmp_path, args, flag):
    (tmp_path / "x.txt").write_text("x\n")
    assert_one_line_error(cli(tmp_path, *args), flag, "must be")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]  # nothing written


def test_values_that_would_be_silently_ignored_are_refused(tmp_path):
    """Flags of a step that is off, or of the other dedup method, used to be ignored whatever they held."""
    (tmp_path / "x.txt").write_text("x\n")
    cases = [
        (["filter", "x.txt", "--out-dir", "o", "--no-langid", "--no-harmful", "--lang-threshold", "nan"],
         "--lang-threshold"),
        (["filter", "x.txt", "--out-dir", "o", "--no-harmful", "--nsfw-threshold", "3"], "--nsfw-threshold"),
        (["dedup", "exact", "x.txt", "--out-dir", "o", "--threshold", "7"], "--threshold"),
        (["dedup", "exact", "x.txt", "--out-dir", "o", "--ngrams", "0"], "--ngrams"),
    ]
    for args, flag in cases:
        assert_one_line_error(cli(tmp_path, *args), flag, "must be")
    assert_one_line_error(cli(tmp_path, "assets", "list", "lid"), "assets list takes no names")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]  # nothing written


def test_filter_refuses_a_language_the_model_does_not_know(tmp_path):
    # --lang zz used to run and drop every document (other_lang:en), exit 0
    wet = _wet(tmp_path / "a.warc.wet.gz")
    assert_one_line_error(cli(tmp_path, "filter", wet, "--out-dir", "f", "--lang", "en", "zz", "--no-harmful"),
                          "--lang zz", "not a language code")
    assert not (tmp_path / "f").exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, vocab):
    """A file where an output's folder must be (was "File exists: <file>" or "Not a directory")."""
    wet = _wet(tmp_path / "a.warc.wet.gz")
    shard = _gzip_jsonl(tmp_path / "s.jsonl.gz", ["some words here"])
    (tmp_path / "urls.txt").write_text("http://a.example/\n")
    (tmp_path / "file").write_text("a file")
    cases = [
        ["extract", wet, "--out", "file/x.jsonl"],
        ["tokenize", shard, "--out", "file/t.bin", "--gpt2-vocab", vocab],
        ["quality", "sample-urls", "--urls", "urls.txt", "--out", "file/u.txt"],
        ["quality", "train", "--positives", wet, "--negatives", shard, "--no-filter", "--out", "file/m.bin",
         "--work-dir", "work"],
        ["filter", wet, "--out-dir", "file/sub", "--no-langid", "--no-harmful"],
        ["dedup", "exact", shard, "--out-dir", "file/sub"],
    ]
    for args in cases:
        assert_one_line_error(cli(tmp_path, *args), f"{tmp_path / 'file'} is a file, not a folder")
    assert_one_line_error(cli(tmp_path, "extract", wet, "--out", tmp_path), "is a folder; expected a file path")
    assert not (tmp_path / "work").exists()


def test_empty_or_wrong_kind_inputs_are_refused_not_turned_into_nonsense(tmp_path, vocab):
    wet = _wet(tmp_path / "a.warc.wet.gz")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "none.txt").write_text("\n\n")
    for name in ("t.bin", "u.txt"):
        (tmp_path / name).write_bytes(PRECIOUS)
    # a WET file was one "document" of WARC headers and text; an empty text file one lone <|endoftext|>
    assert_one_line_error(cli(tmp_path, "tokenize", wet, "--out", "t.bin", "--gpt2-vocab", vocab),
                          "a.warc.wet.gz is a WARC/WET file")
    assert_one_line_error(cli(tmp_path, "tokenize", "empty.txt", "blank.txt", "--out", "t.bin", "--gpt2-vocab",
                              vocab), "no documents")
    # an empty URL list wrote an output of one blank line ("0 URLs in u.txt")
    assert_one_line_error(cli(tmp_path, "quality", "sample-urls", "--urls", "none.txt", "--out", "u.txt"),
                          "no URLs in none.txt")
    # the same file as both classes trained a classifier that cannot tell them apart
    assert_one_line_error(cli(tmp_path, "quality", "train", "--positives", wet, "--negatives", "./a.warc.wet.gz",
                              "--no-filter", "--out", "m.bin", "--work-dir", "work"),
                          "both --positives and --negatives")
    # nothing to classify was still given a language ("en 0.12")
    assert_one_line_error(cli(tmp_path, "classify", "lang", "blank.txt"), "blank.txt holds no text")
    assert (tmp_path / "t.bin").read_bytes() == PRECIOUS and (tmp_path / "u.txt").read_bytes() == PRECIOUS
    assert not (tmp_path / "m.bin").exists() and not (tmp_path / "work").exists()


def test_classify_reads_a_gzipped_text_file_decompressed(tmp_path):
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(("word " * 60 + "\n").encode()))
    r = cli(tmp_path, "classify", "gopher", "t.txt.gz")  # was judged on its compressed bytes
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"keep": True, "failed": []}


# ---------------------------------------------------------------- class 6: filter's partial failures


def test_filter_reports_failed_inputs_and_processes_the_rest(tmp_path):
    good = _wet(tmp_path / "good.warc.wet.gz")
    whole = _wet(tmp_path / "long.warc.wet.gz", n=40).read_bytes()
    (tmp_path / "long.warc.wet.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    bad = bad_inputs(tmp_path / "bad", ".warc.wet")
    inputs = [good, tmp_path / "long.warc.wet.gz", *bad.values()]
    r = cli(tmp_path, "filter", *inputs, "--out-dir", "f", "--no-langid", "--no-harmful", "--min-chars", "10")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{len(bad) + 1} of {len(inputs)} inputs failed" in r.stderr
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    files = {Path(f["input"]).name: f for f in report["files"]}
    assert files["good.warc.wet.gz"]["ok"] and files["good.warc.wet.gz"]["kept"] == 6
    failed = {Path(f["input"]).name: f for f in report["summary"]["failed_files"]}
    assert set(failed) == {"long.warc.wet.gz", *(p.name for p in bad.values())}
    assert failed["long.warc.wet.gz"]["partial"] and files["long.warc.wet.gz"]["kept"] > 0  # whole records kept
    assert "damaged" in failed["cut.warc.wet.gz"]["error"] and "damaged" in failed["plain.warc.wet.gz"]["error"]
    assert "No such file" in failed["missing.warc.wet"]["error"]
    assert "folder" in failed["folder.warc.wet"]["error"]
    assert "no WARC records" in failed["empty.warc.wet"]["error"]
    assert "not a WARC/WET" in failed["garbage.warc.wet"]["error"]
    shards = sorted(p.name for p in (tmp_path / "f").glob("*.jsonl.gz"))
    assert shards == ["good.jsonl.gz", "long.jsonl.gz"]  # failed-from-the-start inputs write no shard


def test_filter_names_a_warc_given_as_wet(tmp_path):
    warc = tmp_path / "pages.warc.gz"
    write_warc_responses(warc, [("http://x/", b"<p>Hello</p>", "text/html")])
    r = cli(tmp_path, "filter", warc, "--out-dir", "f", "--no-langid", "--no-harmful")
    assert r.returncode == 1
    error = json.loads((tmp_path / "f" / "report.json").read_text())["summary"]["failed_files"][0]["error"]
    assert "--input-kind warc" in error


# ---------------------------------------------------------------- class 8: the README's chain, as written


def readme_offline_chain() -> list[str]:
    """The README's block of commands marked as runnable without models or network."""
    text = README.read_text()
    block = re.search(r"<!-- offline chain -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README lost its offline chain block"
    return [ln.split("  #")[0].strip() for ln in block.group(1).splitlines() if ln.startswith("uv run cs336-data")]


def test_readme_offline_chain_runs_as_written(tmp_path):
    for i in range(2):
        _wet(tmp_path / "CC" / f"CC-{i}.warc.wet.gz", n=5, start=3 * i)  # pages 3 and 4 are in both files
    table = _byte_to_char()
    (tmp_path / "vocab.json").write_text(json.dumps({**{table[b]: b for b in range(256)}, "<|endoftext|>": 256}))
    (tmp_path / "tokens.bin").write_bytes(PRECIOUS)  # an old result: a successful run replaces it
    commands = readme_offline_chain()
    assert [c.split()[3] for c in commands] == ["filter", "dedup", "dedup", "tokenize"]
    py = f'"{sys.executable}" -m cs336_data'
    for command in commands:
        r = subprocess.run(command.replace("uv run cs336-data", py), shell=True, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (command, r.stderr[-2000:])
    exact = [ln for f in sorted((tmp_path / "exact").glob("*.jsonl.gz")) for ln in gzip.decompress(f.read_bytes())
             .decode().splitlines()]
    assert len(exact) == 6  # pages 3 and 4 (one line each) occur twice: exact line dedup empties and drops them
    assert json.loads(r.stdout.strip().splitlines()[-1])["documents"] == 6
    assert (np.fromfile(tmp_path / "tokens.bin", dtype=np.uint16) == 256).sum() == 6  # one EOT per document
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary left behind
