"""Issue 17 for `cs336-scaling`: every command keeps the user's files safe, rejects bad values with one line
naming the flag or file, and the training API's contract and startup checks hold over real HTTP.

The real CLI runs in subprocesses (`python -m cs336_scaling`, cwd a tmp folder). Token-file checks run before
torch is imported, so the whole file stays fast on a 2-core machine.
"""

import gzip
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "assignment3-scaling"
EXAMPLE = PACKAGE / "cs336_scaling" / "examples" / "isoflops_synthetic.json"


def cli(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs336_scaling", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, stderr exactly one line `cs336-scaling: error: …` without a traceback, naming what it should."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("cs336-scaling: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def snapshot(paths: list[Path]) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


# --- class 4: a family of bad inputs, each one line and exit 2 ------------------------------------------------


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """Missing, empty, folder, truncated gzip, garbage bytes and wrong JSON shapes."""
    files = {"missing": tmp_path / "missing.json", "empty": tmp_path / "empty.json", "folder": tmp_path / "folder",
             "garbage": tmp_path / "garbage.json", "truncated_gzip": tmp_path / "runs.json.gz",
             "object": tmp_path / "object.json", "numbers": tmp_path / "numbers.json",
             "missing_key": tmp_path / "missing_key.json", "negative": tmp_path / "negative.json",
             "one_budget": tmp_path / "one_budget.json"}
    files["empty"].write_bytes(b"")
    files["folder"].mkdir()
    files["garbage"].write_bytes(bytes(range(256)) * 4)
    files["truncated_gzip"].write_bytes(gzip.compress(EXAMPLE.read_bytes())[:40])
    files["object"].write_text('{"parameters": 1}')
    files["numbers"].write_text("[1, 2, 3]")
    files["missing_key"].write_text('[{"parameters": 1e8, "compute_budget": 1e18}]')
    files["negative"].write_text('[{"parameters": -1e8, "compute_budget": 1e18, "final_loss": 3.0}]')
    files["one_budget"].write_text('[{"parameters": 1e8, "compute_budget": 1e18, "final_loss": 3.0}]')
    return files


def test_isoflops_bad_data_family_is_one_line_and_outputs_survive(tmp_path, bad_files):
    out = tmp_path / "out"
    out.mkdir()
    existing = [out / "a3_isoflops_n_opt.png", out / "a3_isoflops_d_opt.png", out / "a3_isoflops_profiles.png",
                tmp_path / "summary.json"]
    for i, path in enumerate(existing):
        path.write_bytes(f"precious {i}".encode())
    before = snapshot(existing)
    for name, path in bad_files.items():
        result = cli(tmp_path, "isoflops", "--data", str(path), "--out-dir", str(out), "--json",
                     str(tmp_path / "summary.json"))
        assert_one_line_error(result, path.name)
        assert snapshot(existing) == before, name
    assert sorted(os.listdir(out)) == sorted(p.name for p in existing[:3])  # no temporary files left behind


def test_serve_and_study_bad_environment_is_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "not_a_db.sqlite").write_bytes(b"this is not SQLite" * 10)
    before = (tmp_path / "not_a_db.sqlite").read_bytes()
    cases = [
        (["serve", "--api-key", "k", "--port", "99999"], ["--port", "99999"]),
        (["serve", "--api-key", "k", "--db", "folder"], ["--db", "folder"]),
        (["serve", "--api-key", "k", "--db", "not_a_db.sqlite"], ["--db", "not_a_db.sqlite"]),
        (["serve", "--db", "x.sqlite"], ["API key"]),
        (["study", "--url", f"http://127.0.0.1:{free_port()}", "--api-key", "k"], ["http://127.0.0.1:"]),
        (["study", "--url", "http://127.0.0.1:1"], ["--api-key"]),
        (["study", "--cache", "folder"], ["--cache", "folder"]),
    ]
    for args, needles in cases:
        assert_one_line_error(cli(tmp_path, *args), *needles)
    assert (tmp_path / "not_a_db.sqlite").read_bytes() == before
    with socket.socket() as taken:  # a port in use: one line, not uvicorn's log and exit 1
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_one_line_error(cli(tmp_path, "serve", "--api-key", "k", "--port", port, "--db", "db.sqlite"), port)


# --- class 2: numeric options with no sense, refused naming the flag ------------------------------------------


@pytest.mark.parametrize("args, flag", [
    (["serve", "--api-key", "k", "--budget", "nan"], "--budget"),
    (["serve", "--api-key", "k", "--budget", "inf"], "--budget"),
    (["serve", "--api-key", "k", "--budget", "-1"], "--budget"),
    (["serve", "--api-key", "k", "--port", "-1"], "--port"),
    (["serve", "--api-key", "k", "--noise", "-0.1"], "--noise"),
    (["study", "--budget", "nan"], "--budget"),
    (["study", "--target", "0"], "--target"),
    (["study", "--noise", "-1"], "--noise"),
    (["train", "--train-flops", "nan"], "--train-flops"),
    (["train", "--learning-rate", "0"], "--learning-rate"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--d-model", "100", "--num-heads", "3"], "--num-heads"),
    (["profile", "--budgets", "1e14", "-1", "--shapes", "128x2x2"], "--budgets"),
    (["profile", "--budgets", "1e14", "--shapes", "128x2"], "--shapes"),
    (["profile", "--budgets", "1e14", "--shapes", "128x2x2", "--time-limit-s", "-1"], "--time-limit-s"),
    (["train", "--train-flops", "0.5"], "--train-flops"),  # was "must be > 0, got 0" (truncated to an int)
    (["profile", "--budgets", "0.5", "--shapes", "128x2x2"], "--budgets"),  # was the error of --train-flops
    (["make-tokens", "--out", "t.npy", "--vocab-size", "70000"], "--vocab-size"),
    (["make-tokens", "--out", "t.npy", "--stories", "0"], "--stories"),
    (["isoflops", "--data", str(EXAMPLE), "--predict", "-1"], "--predict"),
])
def test_numeric_flags_out_of_range_are_refused_naming_the_flag(tmp_path, args, flag):
    assert_one_line_error(cli(tmp_path, *args), flag)
    assert not (tmp_path / "t.npy").exists() and not (tmp_path / "runs").exists()


# --- class 3: token files of the wrong kind ---------------------------------------------------------------------


def test_token_files_of_the_wrong_kind_are_refused_naming_the_file(tmp_path):
    pattern = np.arange(5000) % 17
    files = {"f32.npy": pattern.astype(np.float32), "bool.npy": (pattern % 2).astype(bool),
             "negative.npy": pattern.astype(np.int64) - 1, "too_big.npy": pattern.astype(np.uint16) + 32,
             "short.npy": np.ones(100, np.uint16), "matrix.npy": np.ones((100, 100), np.uint16)}
    for name, array in files.items():
        np.save(tmp_path / name, array)
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage" * 10)
    (tmp_path / "empty.npy").write_bytes(b"")
    for name in [*files, "garbage.npy", "empty.npy", "missing.npy"]:
        serve = ["serve", "--api-key", "k", "--trainer", "real", "--port", "0", "--db", "db.sqlite"]
        # every kind through `train`; `serve` (slower to start) on a few: the same check runs at its startup
        for command in (["train"], serve) if name in ("f32.npy", "negative.npy", "missing.npy") else (["train"],):
            result = cli(tmp_path, *command, "--tokens", name, "--vocab-size", "32", "--context-length", "16",
                         "--device", "cpu")
            assert_one_line_error(result, name)
    assert not (tmp_path / "db.sqlite").exists()  # serve failed before touching its database


# --- class 1: outputs replaced only on success, never over an input -------------------------------------------


def test_outputs_equal_to_inputs_are_refused(tmp_path):
    data = tmp_path / "runs.json"
    data.write_bytes(EXAMPLE.read_bytes())
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(5000, dtype=np.uint16) % 17)
    cache = tmp_path / "cache.sqlite"
    cache.write_bytes(b"")
    before = snapshot([data, tokens, cache])
    cases = [
        (["isoflops", "--data", "runs.json", "--json", str(data)], "runs.json"),
        (["isoflops", "--data", "runs.json", "--out-dir", ".", "--prefix", "x", "--json", "./runs.json"], "runs.json"),
        (["profile", "--budgets", "1e9", "--shapes", "64x2x2", "--tokens", "tokens.npy", "--results", "tokens.npy"],
         "tokens.npy"),
        (["study", "--cache", "cache.sqlite", "--report", "./cache.sqlite"], "cache.sqlite"),
    ]
    os.symlink(data, tmp_path / "link.json")
    cases.append((["isoflops", "--data", "link.json", "--json", "runs.json"], "runs.json"))
    for args, needle in cases:
        assert_one_line_error(cli(tmp_path, *args), "would overwrite", needle)
        assert snapshot([data, tokens, cache]) == before


def test_profile_results_tolerate_a_half_written_last_line(tmp_path):
    from cs336_scaling.cli import load_profile

    row = {"d_model": 64, "num_layers": 2, "train_flops": 10**9, "n": 98304, "loss": 3.2}
    path = tmp_path / "profile.jsonl"
    path.write_text(json.dumps(row) + "\n" + '{"d_model": 128, "num_la')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = load_profile(str(path))
    assert list(done) == [(64, 2, 10**9)]
    assert any("profile.jsonl" in str(w.message) for w in caught)
    assert path.read_text() == json.dumps(row) + "\n"  # the next append starts on a line of its own


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    """A folder where an output file goes, or a file where an output folder goes, was refused only when written:
    after the fit (isoflops), the whole study (20 s, its report and figures already replaced), the tokenizer's
    training (make-tokens) or a profile's runs, with "File exists: ..." as the message."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("a file")
    tokens = ["--tokens", "tokens.npy", "--vocab-size", "32", "--context-length", "16", "--device", "cpu"]
    np.save(tmp_path / "tokens.npy", np.arange(5000, dtype=np.uint16) % 17)
    cases = [
        (["isoflops", "--data", str(EXAMPLE), "--json", "folder"], ["--json folder is a folder"]),
        (["isoflops", "--data", str(EXAMPLE), "--out-dir", "file.txt"], ["--out-dir file.txt is a file"]),
        (["study", "--json", "folder"], ["--json folder is a folder"]),
        (["study", "--out-dir", "file.txt/figs"], ["--out-dir file.txt/figs", "file.txt is a file"]),
        (["study", "--cache", "file.txt/cache.sqlite"], ["--cache", "file.txt is a file"]),
        (["make-tokens", "--out", "folder", "--stories", "10", "--vocab-size", "300"], ["--out folder is a folder"]),
        (["make-tokens", "--out", "t.npy", "--work-dir", "file.txt"], ["--work-dir file.txt is a file"]),
        (["profile", "--budgets", "1e9", "--shapes", "64x2x2", "--results", "folder", *tokens], ["--results"]),
        (["profile", "--budgets", "1e9", "--shapes", "64x2x2", "--figure-prefix", "file.txt/x", *tokens],
         ["--figure-prefix", "file.txt is a file"]),
        (["serve", "--api-key", "k", "--db", "file.txt/db.sqlite"], ["--db", "file.txt is a file"]),
    ]
    for args, needles in cases:
        assert_one_line_error(cli(tmp_path, *args), *needles)
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "folder", "tokens.npy"]  # nothing written, no run folder
    assert not os.listdir(tmp_path / "folder")


def test_profile_results_file_that_is_not_utf8_or_in_a_new_folder(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(5000, dtype=np.uint16) % 17)
    (tmp_path / "bytes.jsonl").write_bytes(b"\xff\xfe not UTF-8\n")
    args = ["profile", "--budgets", "1e9", "--shapes", "64x2x2", "--tokens", "tokens.npy", "--vocab-size", "32",
            "--context-length", "16", "--device", "cpu", "--max-steps", "1", "--eval-batches", "1"]
    # was the codec's message alone, without the file
    assert_one_line_error(cli(tmp_path, *args, "--results", "bytes.jsonl"), "cannot read bytes.jsonl")
    # was: the run trained, then "No such file or directory" when appending its row (the run lost)
    result = cli(tmp_path, *args, "--results", "new/profile.jsonl", "--figure-prefix", "new/fig")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "new" / "profile.jsonl").read_text())["train_flops"] == 10**9


def test_serve_refuses_an_empty_api_key(tmp_path):
    # an empty key let in every request that sent `api_key=` (it used to start and serve)
    assert_one_line_error(cli(tmp_path, "serve", "--api-key", "", "--db", "db.sqlite"), "--api-key", "empty")
    assert not (tmp_path / "db.sqlite").exists()


# --- class 7: the training API over real HTTP ----------------------------------------------------------------


def get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        assert error.headers["content-type"] == "application/json"
        return error.code, json.loads(error.read())


def wait_for(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"server did not start at {url}")


GOOD = {"d_model": 128, "num_layers": 2, "num_heads": 2, "batch_size": 128, "learning_rate": 1e-3,
        "train_flops": int(1e13)}


def query(url: str, **params) -> str:
    return url + "/loss?" + urllib.parse.urlencode({**GOOD, "api_key": "k", **params})


def test_served_contract_rejects_bad_shapes_uncharged_and_documents_every_parameter(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cs336_scaling", "serve", "--api-key", "k", "--port", str(port),
                               "--db", "db.sqlite", "--budget", "1e14"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(url + "/openapi.json", server)
        status, body = get(query(url, d_model=100, num_heads=3))
        assert status == 404 and body == {"message": "d_model must be divisible by num_heads, got d_model=100, "
                                                     "num_heads=3"}
        status, body = get(query(url, d_model=130, num_heads=4))
        assert status == 404 and "divisible" in body["message"]
        assert get(f"{url}/total_flops_used?api_key=k") == (200, 0.0)  # nothing charged
        assert get(f"{url}/previous_runs?api_key=k") == (200, {"previous_runs": []})
        status, body = get(query(url))
        assert status == 200 and body["total_flops_used"] == 1e13
        status, body = get(query(url, learning_rate="nan"))
        assert status == 404 and "learning_rate" in body["message"]
        status, spec = get(url + "/openapi.json")
        documented = {p["name"]: p.get("description", "") for p in spec["paths"]["/loss"]["get"]["parameters"]}
        assert set(documented) == {*GOOD, "api_key"} and all(documented.values()), documented
        for endpoint in ("/total_flops_used", "/previous_runs"):
            names = [p["name"] for p in spec["paths"][endpoint]["get"]["parameters"]]
            assert names == ["api_key"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_trainer_failure_is_a_json_500_and_charges_nothing():
    from cs336_scaling.server import BackgroundServer, RunStore, TrainingService

    def broken(config):
        raise RuntimeError("out of memory")

    with BackgroundServer(TrainingService(broken, ["k"], RunStore(":memory:"), 1e18)) as server:
        status, body = get(query(server.url))
        assert status == 500 and body == {"message": "internal error: RuntimeError: out of memory"}
        assert get(f"{server.url}/total_flops_used?api_key=k") == (200, 0.0)


# --- class 8: the README's commands, as written ----------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    text = (PACKAGE / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["uv", "run", "cs336-scaling"]:
                commands.append(words[3:])
    return commands


def test_readme_commands_parse_and_their_inputs_exist_in_a_clone(tmp_path):
    from cs336_scaling.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 8
    produced: set[str] = set()
    for argv in commands:
        args = build_parser().parse_args(argv)
        for flag in ("data", "tokens"):
            path = getattr(args, flag, None)
            if path:
                assert (ROOT / path).exists() or path in produced, f"README: {' '.join(argv)}: {path} is nowhere"
                assert not path.startswith(".."), f"README points outside the clone: {path}"
        if args.command == "make-tokens":
            produced.add(args.out)
    assert "../" not in " ".join(" ".join(argv) for argv in commands)


def test_readme_isoflops_commands_run_as_written(tmp_path):
    """The cheap README commands (approach 2 on the shipped data) from a folder shaped like the repository root
    (the package linked in): they run, and their outputs land in runs/, not in the tracked fig/."""
    os.symlink(PACKAGE, tmp_path / "assignment3-scaling")
    out = tmp_path / "runs" / "a3_isoflops"
    out.mkdir(parents=True)
    (out / "a3_isoflops_n_opt.png").write_text("an older figure")  # replaced whole, by a rename
    commands = [argv for argv in readme_commands() if argv[0] == "isoflops" and "--approach3" not in argv]
    assert commands
    for argv in commands:
        result = cli(tmp_path, *argv)
        assert result.returncode == 0, result.stderr
    assert (out / "a3_isoflops_n_opt.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(out)) == ["a3_isoflops_d_opt.png", "a3_isoflops_n_opt.png", "a3_isoflops_profiles.png"]
    assert sorted(os.listdir(tmp_path)) == ["assignment3-scaling", "runs"]  # nothing beside, no temporary file
