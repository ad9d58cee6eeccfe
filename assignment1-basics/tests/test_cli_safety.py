"""`cs336-basics` keeps the user's files safe and fails in one line: the real CLI, run in subprocesses.

Each bad input (missing, empty, a folder, garbage bytes, not UTF-8, JSON of the wrong shape, a damaged
checkpoint) must end with exit code 2 and exactly one stderr line `cs336-basics <cmd>: error: ...`, never a
traceback; a command that fails leaves an existing destination byte-identical; an output that is an input is
refused. Inputs are tiny (a ~18 KB corpus, a 280-token vocabulary) and most cases never import torch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cs336_basics.cli import main
from cs336_basics.corpus import write_corpus

PROG = "cs336-basics"


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs336_basics", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, stderr exactly one line `cs336-basics ...: error: ...` naming `fragments`, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(PROG) and ": error: " in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a tiny corpus, its tokenizer and encoded splits, and the family of bad inputs."""
    root = tmp_path_factory.mktemp("safety")
    write_corpus(str(root / "train.txt"), num_stories=60, seed=0)
    write_corpus(str(root / "val.txt"), num_stories=10, seed=1)
    assert main(["train-tokenizer", "--input", str(root / "train.txt"), "--vocab-size", "280",
                 "--out-dir", str(root / "tok")]) == 0
    for split in ("train", "val"):
        assert main(["encode", "--tokenizer", str(root / "tok"), "--input", str(root / f"{split}.txt"),
                     "--output", str(root / f"{split}.npy")]) == 0
    (root / "empty.txt").write_bytes(b"")
    (root / "folder").mkdir()
    (root / "garbage.bin").write_bytes(bytes(range(128, 256)) * 8)
    (root / "latin1.txt").write_bytes("Once upon a time, a café. Ça va?".encode("latin-1"))
    bad_tokenizers = {"list": b"[1, 2, 3]", "ids": b'{"a": "x"}', "empty": b"", "garbage": bytes(range(128, 256)),
                      "object": b"{}", "negative": b'{"a": -1}'}
    for name, vocab in bad_tokenizers.items():
        (root / f"tok-{name}").mkdir()
        (root / f"tok-{name}" / "vocab.json").write_bytes(vocab)
        (root / f"tok-{name}" / "merges.txt").write_bytes((root / "tok" / "merges.txt").read_bytes())
    (root / "tok-merges").mkdir()
    (root / "tok-merges" / "vocab.json").write_bytes((root / "tok" / "vocab.json").read_bytes())
    (root / "tok-merges" / "merges.txt").write_text("#version: 0.2\none two three\n")
    bad_runs = {"garbage": bytes(range(128, 256)) + b"\n", "list": b"[1, 2]\n",
                "no-loss": b'{"step": 1, "split": "train"}\n', "events-only": b'{"step": 1, "split": "event"}\n',
                "empty": b"", "bad-middle": b'{"step": 1,\n{"step": 2, "split": "train", "loss": 1, "wall_s": 1}\n'}
    for name, metrics in bad_runs.items():
        (root / f"run-{name}").mkdir()
        (root / f"run-{name}" / "metrics.jsonl").write_bytes(metrics)
    for name, checkpoint in {"empty": b"", "garbage": b"garbage, not a checkpoint", "truncated": b"PK\x03\x04"}.items():
        (root / f"run-{name}-checkpoint").mkdir()
        (root / f"run-{name}-checkpoint" / "checkpoint.pt").write_bytes(checkpoint)
    return root


BAD_TEXTS = ["missing.txt", "empty.txt", "folder", "garbage.bin", "latin1.txt"]
BAD_INPUTS = [
    *[("train-tokenizer", ["--input", t, "--vocab-size", "280", "--out-dir", "out"]) for t in BAD_TEXTS],
    ("train-tokenizer", ["--input", "train.txt", "--vocab-size", "100", "--out-dir", "out"]),
    ("train-tokenizer", ["--input", "train.txt", "--vocab-size", "abc", "--out-dir", "out"]),
    ("train-tokenizer", ["--input", "train.txt", "--vocab-size", "280", "--out-dir", "train.npy"]),
    *[("encode", ["--tokenizer", "tok", "--input", t, "--output", "out.npy"]) for t in BAD_TEXTS],
    *[("encode", ["--tokenizer", tok, "--input", "train.txt", "--output", "out.npy"])
      for tok in ["missing", "train.txt", "tok-list", "tok-ids", "tok-garbage", "tok-merges"]],
    ("encode", ["--tokenizer", "tok", "--input", "train.txt", "--output", "folder"]),
    *[("plot", ["--runs", run, "--out", "curve.png"])
      for run in ["missing", "train.txt", "folder", "run-garbage", "run-list", "run-no-loss", "run-bad-middle"]],
    ("plot", ["--runs", "run-no-loss", "run-list", "--labels", "one", "--out", "curve.png"]),
    *[("sweep", [kind, "--values", *values, "--train-data", "train.npy", "--val-data", "val.npy"])
      for kind, values in [("batch-size", ["0"]), ("batch-size", ["two"]), ("batch-size", ["8", "8"]),
                           ("lr", ["-1e-3"]), ("lr", ["nan"]), ("lr", []), ("ablations", ["no-such-ablation"])]],
    *[("sweep", ["lr", "--values", "1e-3", *where, "--preset", "quickstart", "--max-steps", "1",
                 "--train-data", "train.npy", "--val-data", "val.npy"])  # a file in the way: refused before training
      for where in (["--figure", "train.txt/sweep.png"], ["--out-root", "train.txt", "--figure", "sweep.png"])],
    *[("quickstart", ["--train-text", t, "--val-text", "val.txt", "--out-dir", "qs"]) for t in BAD_TEXTS[:3]],
    ("quickstart", ["--train-text", "train.txt", "--out-dir", "qs"]),
    ("quickstart", ["--vocab-size", "100", "--out-dir", "qs"]),
    *[("generate", ["--run-dir", run, "--tokenizer", "tok", "--prompt", "Once"])
      for run in ["missing", "folder", "run-empty-checkpoint", "run-garbage-checkpoint", "run-truncated-checkpoint"]],
    ("generate", ["--run-dir", "run-empty-checkpoint", "--tokenizer", "tok", "--prompt", "Once", "--top-p", "0"]),
]


@pytest.mark.parametrize(("command", "args"), BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_inputs_fail_in_one_line(work, command, args):
    before = sorted(p.name for p in work.iterdir())
    assert_one_line_error(cli(work, command, *args), f"{PROG}")
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written on the way to the error


@pytest.fixture(scope="module")
def trained_run(work) -> Path:
    """A run folder as `train` leaves it, for a tiny untrained model over the 280-token tokenizer (saved
    directly: generate only reads the checkpoint, and training here would only cost time)."""
    import torch

    from cs336_basics.checkpoint import save_checkpoint
    from cs336_basics.model import TransformerConfig, TransformerLM

    config = TransformerConfig(vocab_size=280, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    model = TransformerLM(config)
    (work / "run").mkdir()
    save_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), 0, work / "run" / "checkpoint.pt",
                    extra={"model_config": config.to_dict()})
    return work / "run"


def test_generate_refuses_a_tokenizer_larger_than_the_model(work, trained_run):
    assert main(["train-tokenizer", "--input", str(work / "train.txt"), "--vocab-size", "300",
                 "--out-dir", str(work / "tok300")]) == 0
    assert_one_line_error(cli(work, "generate", "--run-dir", trained_run, "--tokenizer", "tok300", "--prompt", "Once",
                              "--device", "cpu"), "299", "280")


def test_generate_says_when_max_new_tokens_is_cut_to_the_context(work, trained_run):
    result = cli(work, "generate", "--run-dir", trained_run, "--tokenizer", "tok", "--prompt", "Once",
                 "--max-new-tokens", "1000", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "note:" in line]
    assert len(notes) == 1 and "--max-new-tokens 1000 cut to" in notes[0] and "16 tokens" in notes[0], result.stderr
    assert "### Once" in result.stdout


# Nonsense that used to pass (or crash with a traceback), each refused in one line naming the flag; none imports
# torch before the error except the non-UTF-8 prompt (which needs the tokenizer).
NAMED_ERRORS = [
    (["generate", "--run-dir", "run", "--tokenizer", "tok", "--prompt", "Once", "--temperature", "nan"],
     ["generate: error:", "--temperature must be finite and >= 0, got nan"]),  # was a RuntimeError traceback
    (["generate", "--run-dir", "run", "--tokenizer", "tok", "--prompt", "Once", "--temperature", "inf"],
     ["--temperature must be finite"]),  # was accepted: uniform sampling
    (["generate", "--run-dir", "run", "--tokenizer", "tok", "--prompt", "Once", "--top-p", "1.5"],
     ["generate: error:", "--top-p must be > 0 and <= 1, got 1.5"]),
    (["train-tokenizer", "--input", "train.txt", "--vocab-size", "280", "--out-dir", "out", "--special-token", ""],
     ["--special-token must not be empty"]),  # was a ValueError traceback
    (["train-tokenizer", "--input", "train.txt", "--vocab-size", "280", "--out-dir", "train.txt/tok"],
     ["--out-dir train.txt/tok:", "train.txt is a file, not a folder"]),  # was 'Not a directory'
    (["encode", "--tokenizer", "tok", "--input", "train.txt", "--output", "train.txt/x.npy"],
     ["--output train.txt/x.npy:", "is a file, not a folder"]),  # was 'File exists' after the encoding
    (["plot", "--runs", "run-no-loss", "--out", "train.txt/curve.png"], ["--out train.txt/curve.png:"]),
    (["quickstart", "--out-dir", "qs", "--figure", "train.txt/loss.png"],
     ["--figure train.txt/loss.png:", "is a file, not a folder"]),  # was 'File exists' after the training
    (["quickstart", "--out-dir", "qs", "--vocab-size", "70000"], ["--vocab-size must be <= 65536"]),
    (["quickstart", "--out-dir", "qs", "--device", "nope"], ["--device 'nope' is not a device"]),  # was after encode
]


@pytest.mark.parametrize(("args", "fragments"), NAMED_ERRORS, ids=[" ".join(args) for args, _ in NAMED_ERRORS])
def test_nonsense_is_refused_naming_the_flag_before_any_work(work, args, fragments):
    before = sorted(p.name for p in work.iterdir())
    assert_one_line_error(cli(work, *args), *fragments)
    assert sorted(p.name for p in work.iterdir()) == before


def test_generate_refuses_a_prompt_that_is_not_utf8(work, trained_run):
    result = subprocess.run([sys.executable, "-m", "cs336_basics", "generate", "--run-dir", str(trained_run),
                             "--tokenizer", "tok", "--prompt", os.fsdecode(b"caf\xe9"), "--device", "cpu"],
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "--prompt", "is not valid UTF-8")  # was a UnicodeEncodeError traceback


def _sentinels(*paths: Path) -> dict[Path, bytes]:
    contents = {}
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"precious {path.name}".encode())
        contents[path] = path.read_bytes()
    return contents


# (command line, destinations that already exist): each fails after its destination is known.
FAILING_WRITES = {
    "train-tokenizer not UTF-8": (["train-tokenizer", "--input", "latin1.txt", "--vocab-size", "280", "--out-dir",
                                   "dest"], ["dest/vocab.json", "dest/merges.txt"]),
    "train-tokenizer vocab too small": (["train-tokenizer", "--input", "train.txt", "--vocab-size", "200",
                                         "--out-dir", "dest"], ["dest/vocab.json", "dest/merges.txt"]),
    "encode not UTF-8": (["encode", "--tokenizer", "tok", "--input", "latin1.txt", "--output", "dest/x.npy"],
                         ["dest/x.npy"]),
    "encode misspelt input": (["encode", "--tokenizer", "tok", "--input", "trian.txt", "--output", "dest/x.npy"],
                              ["dest/x.npy"]),
    "encode damaged tokenizer": (["encode", "--tokenizer", "tok-merges", "--input", "train.txt", "--output",
                                  "dest/x.npy"], ["dest/x.npy"]),
    "plot bad run": (["plot", "--runs", "run-no-loss", "--out", "dest/curve.png"], ["dest/curve.png"]),
    "plot bad run into folder": (["plot", "--runs", "run-list", "--out", "dest"], ["dest/loss.png"]),
    "sweep bad values": (["sweep", "lr", "--values", "0", "--out-root", "dest", "--figure", "dest/sweep.png",
                          "--train-data", "train.npy", "--val-data", "val.npy"],
                         ["dest/sweep.png", "dest/lr/summary.json"]),
    "quickstart empty text": (["quickstart", "--train-text", "empty.txt", "--val-text", "val.txt", "--out-dir",
                               "dest"], ["dest/quickstart_loss.png", "dest/quickstart.json"]),
}


@pytest.mark.parametrize("case", FAILING_WRITES)
def test_a_failed_command_leaves_existing_outputs_byte_identical(work, tmp_path, case):
    args, destinations = FAILING_WRITES[case]
    for name in {*args, "tok", "tok-merges"} & {p.name for p in work.iterdir()}:
        os.symlink(work / name, tmp_path / name)
    kept = _sentinels(*(tmp_path / d for d in destinations))
    assert_one_line_error(cli(tmp_path, *args))
    assert {path: path.read_bytes() for path in kept} == kept
    leftovers = [p for p in (tmp_path / "dest").rglob("*") if p.is_file() and p not in kept]
    assert leftovers == []  # no temporary file left beside a destination


def test_an_output_that_is_an_input_is_refused(work, tmp_path):
    text = tmp_path / "train.txt"
    text.write_bytes((work / "train.txt").read_bytes())
    original = text.read_bytes()
    os.symlink(text, tmp_path / "link.txt")
    for output in ("train.txt", "./train.txt", "link.txt", str(text)):
        assert_one_line_error(cli(tmp_path, "encode", "--tokenizer", work / "tok", "--input", "train.txt",
                                  "--output", output), "would overwrite the input")
    # train-tokenizer into the folder its corpus is called vocab.json in
    (tmp_path / "tok").mkdir()
    corpus = tmp_path / "tok" / "vocab.json"
    corpus.write_bytes(original)
    assert_one_line_error(cli(tmp_path, "train-tokenizer", "--input", corpus, "--vocab-size", "280",
                              "--out-dir", "tok"), "would overwrite the input")
    assert text.read_bytes() == original and corpus.read_bytes() == original


def test_an_existing_tokenizer_or_token_file_is_kept_unless_overwrite(work, tmp_path):
    """A second train-tokenizer or encode onto the same output is refused; --overwrite replaces it."""
    kept = _sentinels(tmp_path / "tok" / "vocab.json", tmp_path / "tok" / "merges.txt", tmp_path / "val.npy")
    assert_one_line_error(cli(tmp_path, "train-tokenizer", "--input", work / "val.txt", "--vocab-size", "270",
                              "--out-dir", "tok"), "--out-dir tok already holds a tokenizer", "--overwrite")
    assert_one_line_error(cli(tmp_path, "encode", "--tokenizer", work / "tok", "--input", work / "val.txt",
                              "--output", "val.npy"), "--output val.npy exists", "--overwrite")
    assert {path: path.read_bytes() for path in kept} == kept
    assert cli(tmp_path, "train-tokenizer", "--input", work / "val.txt", "--vocab-size", "270", "--out-dir", "tok",
               "--overwrite").returncode == 0
    assert cli(tmp_path, "encode", "--tokenizer", work / "tok", "--input", work / "val.txt", "--output", "val.npy",
               "--overwrite").returncode == 0
    assert np.array_equal(np.load(tmp_path / "val.npy"), np.load(work / "val.npy"))  # the real encoding now
    assert len(json.loads((tmp_path / "tok" / "vocab.json").read_text())) == 270


def _metrics_run(folder: Path) -> Path:
    folder.mkdir()
    records = [{"step": s, "split": split, "loss": 5.0 - s / 10, "wall_s": s / 2}
               for s in range(1, 6) for split in ("train", "val")]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_plot_into_an_existing_folder_writes_inside_it_and_reports_that_path(tmp_path):
    _metrics_run(tmp_path / "run")
    (tmp_path / "figures").mkdir()
    result = cli(tmp_path, "plot", "--runs", "run", "--out", "figures")
    assert result.returncode == 0, result.stderr
    written = os.path.join("figures", "loss.png")
    assert result.stdout.strip() == f"wrote {written}"
    assert (tmp_path / written).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = cli(tmp_path, "plot", "--runs", "run", "--out", "curve")  # no extension: matplotlib would add one
    assert result.stdout.strip() == "wrote curve.png" and (tmp_path / "curve.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "figures", "run"]


def test_quickstart_figure_goes_into_its_own_folder_unless_asked(tmp_path):
    from cs336_basics.cli import build_parser
    from cs336_basics.quickstart import figure_destination

    assert build_parser().parse_args(["quickstart"]).figure is None
    assert figure_destination("runs/quickstart", None) == os.path.join("runs/quickstart", "quickstart_loss.png")
    assert figure_destination("runs/quickstart", "fig/quickstart_loss.png") == "fig/quickstart_loss.png"
    (tmp_path / "figs").mkdir()
    assert figure_destination("runs/q", str(tmp_path / "figs")) == str(tmp_path / "figs" / "loss.png")


def test_quickstart_over_an_existing_run_needs_overwrite(tmp_path):
    run = tmp_path / "qs" / "run"
    kept = _sentinels(run / "checkpoint.pt", run / "metrics.jsonl", tmp_path / "qs" / "quickstart.json",
                      tmp_path / "qs" / "quickstart_loss.png")
    assert_one_line_error(cli(tmp_path, "quickstart", "--out-dir", "qs"), "--overwrite")
    assert {path: path.read_bytes() for path in kept} == kept
    assert not (tmp_path / "fig").exists() and not (tmp_path / "qs" / "data").exists()
