"""`cs336-basics train` keeps the user's files safe, rejects bad values and stops cleanly (issue 17, classes 1, 2,
3 and 5), checked on the real command in subprocesses.

The failures of classes 1-3 are found before torch is imported, so those subprocesses take about a second; the
interruption test trains a tiny model (d_model 16, one layer, context 8) on generated ids.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

VOCAB = 64
TINY = ["--vocab-size", str(VOCAB), "--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--d-ff", "32",
        "--context-length", "8", "--batch-size", "4", "--device", "cpu", "--no-progress", "--log-interval", "1",
        "--eval-interval", "50", "--eval-batches", "2", "--warmup-steps", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
PROG = "cs336-basics train: error:"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    np.save(root / "train.npy", rng.integers(0, VOCAB, 20_000).astype(np.uint16))
    np.save(root / "val.npy", rng.integers(0, VOCAB, 2_000).astype(np.uint16))
    return root


def _train_args(data: Path, out_dir: Path, *extra: str, train: str = "train.npy") -> list[str]:
    return [sys.executable, "-m", "cs336_basics", "train", "--train-data", str(data / train),
            "--val-data", str(data / "val.npy"), "--out-dir", str(out_dir), *TINY, *extra]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith(PROG), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was created, changed or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _existing_run(folder: Path) -> dict[str, bytes]:
    """A run folder as a previous `train` left it (contents are stand-ins: only the bytes matter here)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"max_steps": 7}\n')
    (folder / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 4.1}\n')
    (folder / "checkpoint.pt").write_bytes(b"weights of a week-long run")
    return _snapshot(folder)


# ------------------------------------------------------------------------------------ class 2: numeric ranges
BAD_NUMBERS = [
    ("--grad-clip", "-1", "--grad-clip must be > 0"),
    ("--grad-clip", "0", "--grad-clip must be > 0"),  # 0 used to freeze the model
    ("--time-limit-s", "-1", "--time-limit-s must be >= 0"),  # used to stop after one step
    ("--rope-theta", "0", "--rope-theta must be > 0"),  # used to surface as "training diverged"
    ("--lr-max", "nan", "--lr-max must be"),
    ("--beta2", "1.5", "--beta2 must be >= 0 and < 1"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--num-heads", "5", "--d-model (16) must be divisible by --num-heads (5)"),
]


def _run_all(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """The commands side by side (each is a second of Python start-up; the box has two cores)."""
    processes = [subprocess.Popen(c, cwd=cwd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for c in commands]
    results = []
    for command, process in zip(commands, processes, strict=True):
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return results


def test_nonsensical_numbers_are_refused_naming_the_flag_and_the_run_is_untouched(data, tmp_path):
    before = _existing_run(tmp_path / "run")
    commands = [_train_args(data, tmp_path / "run", "--resume", flag, value) for flag, value, _ in BAD_NUMBERS]
    for (_, _, expected), result in zip(BAD_NUMBERS, _run_all(commands, tmp_path), strict=True):
        _assert_one_line_error(result, expected)
    assert _snapshot(tmp_path / "run") == before


# ------------------------------------------------------------------------------------ class 3: token files
def _bad_token_files(folder: Path) -> dict[str, str]:
    """name -> what the one-line error must say about it."""
    np.save(folder / "float32.npy", np.zeros(100, dtype=np.float32))
    np.save(folder / "bool.npy", np.ones(100, dtype=bool))
    np.save(folder / "negative.npy", np.array([1, 2, -3] * 50, dtype=np.int32))
    np.save(folder / "too_large.npy", np.array([1, VOCAB, 2] * 50, dtype=np.uint16))
    np.save(folder / "short.npy", np.arange(8, dtype=np.uint16))  # context 8 needs 9 tokens
    np.save(folder / "matrix.npy", np.zeros((4, 50), dtype=np.uint16))
    (folder / "empty.npy").write_bytes(b"")
    (folder / "garbage.npy").write_bytes(os.urandom(300))
    (folder / "truncated.npy").write_bytes((folder / "too_large.npy").read_bytes()[:100])
    (folder / "stories.txt").write_text("Once upon a time there was a text file. " * 20)
    return {"stories.txt": "is a text file; encode it first",
            "float32.npy": "holds float32 values", "bool.npy": "holds bool values",
            "negative.npy": f"id -3 at index 2 is outside [0, vocab_size={VOCAB})",
            "too_large.npy": f"id {VOCAB} at index 1 is outside [0, vocab_size={VOCAB})",
            "short.npy": "too few for --context-length 8", "matrix.npy": "expected a 1-D array",
            "empty.npy": "is empty", "garbage.npy": "not a .npy array", "truncated.npy": "cannot read"}


def test_token_files_of_the_wrong_kind_are_refused_naming_the_file(data, tmp_path):
    bad = _bad_token_files(tmp_path)
    run = lambda name: tmp_path / (os.path.splitext(name)[0] + "-run")
    commands = [_train_args(data, run(name), train=str(tmp_path / name)) for name in bad]
    for (name, expected), result in zip(bad.items(), _run_all(commands, tmp_path), strict=True):
        _assert_one_line_error(result, f"{tmp_path / name}", expected)
        assert not run(name).exists()  # nothing written for a run that cannot start


def test_check_token_ids_scans_every_chunk_of_the_memory_map(tmp_path):
    from cs336_basics.cli_support import UserError
    from cs336_basics.data import check_token_ids, load_tokens

    ids = np.arange(1000, dtype=np.int64) % VOCAB
    ids[977] = VOCAB + 5  # in the last chunk only
    np.save(tmp_path / "t.npy", ids)
    with pytest.raises(UserError, match=f"id {VOCAB + 5} at index 977"):
        check_token_ids(load_tokens(tmp_path / "t.npy"), VOCAB, tmp_path / "t.npy", chunk=100)
    check_token_ids(load_tokens(tmp_path / "t.npy"), VOCAB + 6, tmp_path / "t.npy", chunk=100)


# ------------------------------------------------------------------------------------ class 1: run folders
def test_a_folder_holding_a_run_needs_resume_or_overwrite_and_stays_byte_identical(data, tmp_path):
    before = _existing_run(tmp_path / "run")
    refused = _run(_train_args(data, tmp_path / "run", "--max-steps", "3"), tmp_path)
    _assert_one_line_error(refused, "already holds a run", "--resume", "--overwrite")
    assert _snapshot(tmp_path / "run") == before

    both = _run(_train_args(data, tmp_path / "run", "--resume", "--overwrite"), tmp_path)
    _assert_one_line_error(both, "--resume and --overwrite exclude each other")
    assert _snapshot(tmp_path / "run") == before

    # --overwrite removes the old run only once the new one is ready: a bad token file found later loses nothing
    (tmp_path / "floats.npy").write_bytes(b"")
    np.save(tmp_path / "floats.npy", np.zeros(100, dtype=np.float32))
    late = _run(_train_args(data, tmp_path / "run", "--overwrite", train=str(tmp_path / "floats.npy")), tmp_path)
    _assert_one_line_error(late, "floats.npy", "float32")
    assert _snapshot(tmp_path / "run") == before


def test_resume_without_a_checkpoint_is_one_line(data, tmp_path):
    result = _run(_train_args(data, tmp_path / "nothing-here", "--resume"), tmp_path)
    _assert_one_line_error(result, "--resume: no checkpoint at")
    assert not (tmp_path / "nothing-here").exists()


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04 truncated zip"])
def test_unreadable_checkpoints_are_one_user_error_naming_the_file(tmp_path, content):
    from cs336_basics.checkpoint import load_checkpoint_state
    from cs336_basics.cli_support import UserError

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"cannot read checkpoint .*checkpoint\.pt") as info:
        load_checkpoint_state(path)
    assert len(str(info.value).splitlines()) == 1


def test_resume_from_an_empty_or_damaged_checkpoint_is_one_line_and_loses_nothing(data, tmp_path, capsys):
    """The issue's 0-byte checkpoint.pt crashed the error message itself (IndexError); in this process because
    the checkpoint is read after torch is loaded (see `_train_in_process`)."""
    for name, content in (("empty", b""), ("garbage", b"not a checkpoint")):
        _existing_run(tmp_path / name)
        (tmp_path / name / "checkpoint.pt").write_bytes(content)
        before = _snapshot(tmp_path / name)
        capsys.readouterr()
        assert _train_in_process(_train_args(data, tmp_path / name, "--resume")) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith(PROG), err
        assert f"cannot read checkpoint {tmp_path / name / 'checkpoint.pt'}" in err
        assert _snapshot(tmp_path / name) == before


def test_overwrite_starts_a_new_run_in_place_of_the_old_one(data, tmp_path):
    _existing_run(tmp_path / "run")
    assert _train_in_process(_train_args(data, tmp_path / "run", "--overwrite", "--max-steps", "3")) == 0
    assert [(r["step"], r["split"]) for r in _records(tmp_path / "run")] == [(1, "train"), (2, "train"),
                                                                             (3, "train"), (3, "val")]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 3
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() != b"weights of a week-long run"


# ------------------------------------------------------------------------------------ class 5: interruption
def _records(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _trajectory(run: Path) -> list[tuple]:
    return [(r["step"], r["split"], r["loss"]) for r in _records(run) if r["split"] in ("train", "val")]


def _stop_when_running(process: subprocess.Popen, metrics: Path, signum: int, min_lines: int = 5) -> None:
    """Sends `signum` once the run has logged a few steps (so the stop lands mid-run, not at start-up)."""
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= min_lines:
            process.send_signal(signum)
            return
        time.sleep(0.01)


def _train_in_process(args: list[str]) -> int:
    """`cs336-basics train` in this process (torch is loaded once for the whole suite, where a subprocess pays
    ~15 s of imports on this box), with one thread like the subprocesses (OMP_NUM_THREADS=1), so losses can be
    compared bit for bit."""
    import torch

    from cs336_basics.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args[3:])  # without `python -m cs336_basics`
    finally:
        torch.set_num_threads(threads)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigint_and_sigterm_checkpoint_and_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    """The signals go to real `python -m cs336_basics train` processes; the uninterrupted reference and the two
    resumes run the same command in this process (see `_train_in_process`)."""
    steps = ["--max-steps", "300"]
    runs = {signal.SIGINT: tmp_path / "sigint", signal.SIGTERM: tmp_path / "sigterm"}
    processes = {s: _start(_train_args(data, run, *steps), tmp_path) for s, run in runs.items()}
    stoppers = [threading.Thread(target=_stop_when_running, args=(processes[s], runs[s] / "metrics.jsonl", s))
                for s in runs]
    for t in stoppers:
        t.start()
    try:
        assert _train_in_process(_train_args(data, tmp_path / "straight", *steps)) == 0
    finally:
        for t in stoppers:
            t.join()
        for process in processes.values():
            process.wait(timeout=300)

    for signum, process in processes.items():
        _, err = process.communicate(timeout=300)
        name = signal.Signals(signum).name
        assert process.returncode == 128 + signum, (name, process.returncode, err)
        assert "Traceback" not in err, err
        assert f"stopped by {name} after step" in err.strip().splitlines()[-1], err
        run = runs[signum]
        assert (run / "checkpoint.pt").is_file()
        assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary left behind
        last = _records(run)[-1]
        assert last["split"] == "event" and last["signal"] == name and 0 < last["step"] < 300, last

    assert _train_in_process(_train_args(data, runs[signal.SIGINT], *steps, "--resume")) == 0
    # a run killed mid-write leaves a half line: --resume drops it with a warning naming the file
    with open(runs[signal.SIGTERM] / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "split": "tr')
    half_line = re.escape(f"{runs[signal.SIGTERM] / 'metrics.jsonl'}: dropped a half-written last line")
    with pytest.warns(UserWarning, match=half_line):
        assert _train_in_process(_train_args(data, runs[signal.SIGTERM], *steps, "--resume")) == 0

    straight = _trajectory(tmp_path / "straight")
    assert straight[-1][:2] == (300, "val")
    for run in runs.values():
        assert _trajectory(run) == straight  # exactly: same steps, same losses to the last bit
