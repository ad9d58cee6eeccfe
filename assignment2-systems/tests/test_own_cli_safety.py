"""Issue 17 on `cs336-systems`: one-line errors (exit 2) for bad values and files, declared ranges on the numeric
flags, and report files that a failed run leaves byte-identical. The real command runs in a subprocess where
the claim is about the command itself; the family of bad --render files runs `main()` in-process (a subprocess
costs ~15 s of torch import on the shared CI box)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cs336_systems.cli import main

PROG = "cs336-systems: error:"

# A bench-model results file whose tables render but whose figure fails (a precision the plot has no style for):
# the JSON and Markdown are written before the failure, so the old ones must come back.
RESULTS = {
    "env": {"device": "cpu", "gpu": "CPU"},
    "config": {"sizes": ["tiny"], "contexts": [16], "modes": ["forward"], "precisions": ["fp8"],
               "compile_modes": ["eager"], "batch_size": 4, "vocab_size": 256, "warmup": 1, "steps": 2,
               "device": "cpu", "forward_no_grad": False, "memory_snapshot": None, "snapshot_steps": 2,
               "snapshot_max_entries": 200000, "time_budget_s": None, "out_dir": "a", "stem": "model_bench"},
    "rows": [{"size": "tiny", "context": 16, "precision": "fp8", "compile": "eager", "params": 164160,
              "modes": {"forward": {"status": "ok", "mean_ms": 3.4, "std_ms": 0.1, "min_ms": 3.3, "max_ms": 3.5,
                                    "n": 2, "warmup_ms": [3.8]}}}],
}


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs336_systems", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROG) and "Traceback" not in err, err
    return lines[0]


def test_a_failed_render_leaves_the_reports_byte_identical(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = {"model_bench.json": b'{"old": 1}', "model_bench.md": b"# old table\n", "model_bench.png": b"\x89PNG old"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    (tmp_path / "model_bench.json").write_text(json.dumps(RESULTS))
    result = cli(["bench-model", "--render", "model_bench.json", "--out-dir", "out"], tmp_path)
    assert result.returncode == 2
    assert "not a bench-model results file" in one_line(result.stderr)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_bad_numbers_are_refused_naming_the_flag(tmp_path):
    result = cli(["mixed-precision", "--n", "0", "--out-dir", "out"], tmp_path)
    assert result.returncode == 2 and "--n must be >= 1, got 0" in one_line(result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["bench-model", "--steps", "-1"], "--steps must be >= 1"),
    (["bench-model", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bench-model", "--time-budget", "0"], "--time-budget must be > 0"),
    (["bench-allreduce", "--sizes-mb", "1", "-2"], "--sizes-mb must be > 0, got -2.0"),
    (["bench-allreduce", "--iters", "0"], "--iters must be >= 1"),
    (["bench-attention", "--time-budget", "inf"], "--time-budget must be > 0"),
    (["bench-ddp", "--world-size", "0"], "--world-size must be >= 1"),
    (["bench-ddp", "--backend", "gloo", "--timeout", "nan"], "--timeout must be > 0, got nan"),
    (["mixed-precision", "--value", "inf"], "--value must be finite"),
])
def test_every_numeric_flag_has_a_range(argv, message, capsys):
    assert main(argv) == 2
    assert message in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "garbage", "a list", "another shape"])
def test_bad_render_files_are_one_line_errors(tmp_path, capsys, kind):
    path = tmp_path / "r.json"
    content = {"empty": b"", "garbage": b"\xff\x00garbage", "a list": b"[1, 2]",
               "another shape": b'{"rows": 3}'}.get(kind)
    if kind == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert main(["bench-model", "--render", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    assert "r.json" in one_line(capsys.readouterr().err)


def test_out_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    assert main(["mixed-precision", "--device", "cpu", "--out-dir", str(tmp_path / "f")]) == 2
    assert "is a file" in one_line(capsys.readouterr().err)
    assert (tmp_path / "f").read_text() == "keep"
