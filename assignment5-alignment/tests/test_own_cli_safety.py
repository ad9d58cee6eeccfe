"""Issue 17 on `cs336-align` (and the demo): nothing lost, nothing silent.

One test per class: bad inputs end in one `cs336-align: error:` line and exit 2 (class 4), bad numeric values
are refused naming the flag (class 2), outputs and run folders survive failures and are never inputs
(class 1), SIGINT/SIGTERM stop a loop after a checkpointed step from which --resume reproduces the
uninterrupted run (class 5). The signal and a few error cases run the real CLI in a subprocess; the family of
bad inputs runs `main()` in-process (the same code path below `__main__`; a subprocess costs ~15 s of torch
import on the shared CI box).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cs336_alignment.cli import main
from cs336_alignment.testing import tiny_basics_lm, write_tiny_run
from cs336_alignment.training import GRPOConfig, run_grpo
from cs336_alignment.training.eval_config import QuestionSet
from cs336_basics.cli_support import StopRequest
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)

PROG = "cs336-align: error:"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A saved tiny cs336_basics run with its tokenizer, and small SFT / MATH-style / preference data."""
    return write_tiny_run(tmp_path_factory.mktemp("safety"))


def model_flags(setup: Path) -> list[str]:
    return ["--basics-run", str(setup / "run"), "--basics-tokenizer", str(setup / "tok"), "--device", "cpu"]


def sft_argv(setup: Path, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["sft", *model_flags(setup), "--out-dir", str(out), "--data", str(data or setup / "sft.jsonl"),
            "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-3", *extra]


def one_line_error(capsys, argv: list[str]) -> str:
    """Runs `main(argv)`: it must exit 2 with exactly one `cs336-align: error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(PROG) and "Traceback" not in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# Class 4: a family of bad inputs, each a one-line error naming what is wrong.
BAD_DATA = {
    "missing": None,
    "empty": b"",
    "folder": "dir",
    "garbage bytes": b"\xff\xfe\x00\x81garbage\n",
    "truncated JSON": b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp',
    "not an object": b'["prompt", "response"]\n',
    "a string": b'"prompt response"\n',
    "no prompt field": b'{"question": "a", "response": "b"}\n',
}


def make_input(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_files_are_one_line_errors(setup, tmp_path, capsys, kind):
    data = make_input(tmp_path, kind, BAD_DATA[kind])
    err = one_line_error(capsys, sft_argv(setup, tmp_path / "out", data=data))
    assert data.name in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    # the same files for ei/grpo (MATH-style) and eval
    err = one_line_error(capsys, ["grpo", *model_flags(setup), "--out-dir", str(tmp_path / "g"), "--data", str(data)])
    assert data.name in err
    err = one_line_error(capsys, ["eval", "gsm8k", *model_flags(setup), "--data", str(data), "--out",
                                  str(tmp_path / "e")])
    assert data.name in err


def _write(path: Path, content: bytes | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        path.write_bytes(content)


BAD_MODEL_CASES = {  # case: what the one line must say
    "empty checkpoint": "checkpoint.pt is empty",
    "garbage checkpoint": "is not a PyTorch checkpoint",
    "truncated checkpoint": "is not a PyTorch checkpoint",
    "a zip that is no checkpoint": "checkpoint.pt",
    "run is a file": "is not a folder",
    "tokenizer missing": "no_tok does not exist",
    "model folder without config": "has no config.json",
    "model is a file": "is not a folder",
    "empty resume checkpoint": "cannot resume: ",
    "garbage resume checkpoint": "is not a PyTorch checkpoint",
    "out-dir is a file": "exists and is not a folder",
}


@pytest.mark.parametrize("case", list(BAD_MODEL_CASES))
def test_bad_model_and_run_files_are_one_line_errors(setup, tmp_path, capsys, case):
    import zipfile

    run, out = tmp_path / "run", tmp_path / "out"
    flags = ["--basics-run", str(run), "--basics-tokenizer", str(setup / "tok"), "--device", "cpu"]
    extra: list[str] = []
    good = (setup / "run" / "checkpoint.pt").read_bytes()
    if case == "empty checkpoint":
        _write(run / "checkpoint.pt", b"")
    elif case == "garbage checkpoint":
        _write(run / "checkpoint.pt", b"PK\x03\x04 not a zip at all" * 10)
    elif case == "truncated checkpoint":
        _write(run / "checkpoint.pt", good[: len(good) // 2])
    elif case == "a zip that is no checkpoint":
        run.mkdir()
        with zipfile.ZipFile(run / "checkpoint.pt", "w") as z:
            z.writestr("hello.txt", "not a tensor in sight")
    elif case == "run is a file":
        _write(run, b"x")
    elif case == "tokenizer missing":
        flags[1], flags[3] = str(setup / "run"), str(tmp_path / "no_tok")
    elif case.startswith("model"):
        (tmp_path / "hf").mkdir() if case == "model folder without config" else _write(tmp_path / "hf", b"{}")
        flags = ["--model", str(tmp_path / "hf"), "--device", "cpu"]
    else:
        flags[1] = str(setup / "run")
        if case == "empty resume checkpoint":
            _write(out / "checkpoint.pt", b"")
        elif case == "garbage resume checkpoint":
            _write(out / "checkpoint.pt", os.urandom(300))
        else:
            _write(out, b"not a folder")
        extra = ["--resume"] if "resume" in case else []
    before = snapshot(out) if out.is_dir() else None
    err = one_line_error(capsys, ["sft", *flags, "--out-dir", str(out), "--data", str(setup / "sft.jsonl"),
                                  "--num-steps", "1", "--train-batch-size", "2", "--gradient-accumulation-steps",
                                  "1", *extra])
    assert BAD_MODEL_CASES[case] in err
    if before is not None:
        assert snapshot(out) == before


# Class 2: declared ranges, the flag named.
@pytest.mark.parametrize("argv, message", [
    (["sft", "--learning-rate", "-1"], "--learning-rate must be > 0"),
    (["sft", "--learning-rate", "nan"], "--learning-rate must be > 0"),
    (["sft", "--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
    (["sft", "--adam-beta2", "1"], "--adam-beta2 must be >= 0 and < 1"),
    (["sft", "--warmup-steps", "-3"], "--warmup-steps must be >= 0"),
    (["sft", "--time-budget-s", "0"], "--time-budget-s must be > 0"),
    (["sft", "--eval-temperature", "-0.5"], "--eval-temperature must be >= 0"),
    (["grpo", "--cliprange", "-0.1"], "--cliprange must be >= 0"),
    (["grpo", "--group-size", "0"], "--group-size must be >= 1"),
    (["grpo", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be > 0 and <= 1"),
    (["ei", "--sampling-temperature", "inf"], "--sampling-temperature must be >= 0"),
    (["dpo", "--beta", "0"], "--beta must be > 0"),
    (["eval", "--top-p", "0"], "--top-p must be > 0 and <= 1"),
    (["eval", "--n", "0"], "--n must be >= 1"),
    (["eval", "--temperature", "-1"], "--temperature must be >= 0"),
    (["eval", "--min-tokens", "10", "--max-tokens", "5"], "min_tokens <= max_tokens"),
    (["eval", "--device", "nope"], "--device 'nope' is not a device"),
    # used to pass silently (an unused flag) or fail only inside the loop, after the model loaded
    (["sft", "--seq-length", "-5"], "--seq-length must be >= 1"),
    (["sft", "--dist-timeout-s", "nan"], "--dist-timeout-s must be finite and > 0"),
    (["sft", "--device", "nope"], "--device 'nope' is not a device"),
    (["grpo", "--sampling-min-tokens", "10", "--sampling-max-tokens", "4"],
     "--sampling-min-tokens (10) must not exceed --sampling-max-tokens (4)"),
    (["ei", "--sampling-min-tokens", "10", "--sampling-max-tokens", "4"], "must not exceed --sampling-max-tokens"),
])
def test_bad_numbers_name_the_flag(setup, tmp_path, capsys, argv, message):
    if argv[0] == "eval":
        full = ["eval", "gsm8k", *model_flags(setup), "--data", str(setup / "math.jsonl"), "--out", str(tmp_path),
                *argv[1:]]
    else:
        full = [argv[0], *model_flags(setup), "--out-dir", str(tmp_path / "o"), "--data", str(setup / "sft.jsonl"),
                *argv[1:]]
    assert message in one_line_error(capsys, full)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["sft", "--dtype", "float7"], "argument --dtype: invalid choice: 'float7'"),  # was ignored for basics runs
    (["eval", "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    (["orpo", "--lambda", "1"], "unrecognized arguments: --lambda 1"),  # was the usage block and the error
])
def test_flag_errors_are_one_line(setup, tmp_path, capsys, argv, message):
    if argv[0] == "eval":
        full = ["eval", "math", *model_flags(setup), "--data", str(setup / "math.jsonl"), "--out", str(tmp_path),
                *argv[1:]]
    else:
        full = [argv[0], *model_flags(setup), "--out-dir", str(tmp_path / "o"), "--data", str(setup / "sft.jsonl"),
                *argv[1:]]
    with pytest.raises(SystemExit) as exit_info:
        main(full)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("cs336-align") and ": error: " in err and message in err and err.endswith("(see --help)"), err


def test_eval_out_below_a_file_is_refused_before_generating(setup, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("keep")
    err = one_line_error(capsys, ["eval", "math", *model_flags(setup), "--data", str(setup / "math.jsonl"),
                                  "--out", str(tmp_path / "a.txt" / "out"), "--limit", "1", "--max-tokens", "2"])
    assert "a.txt is a file, not a folder" in err  # was 'Not a directory' after the generation
    assert (tmp_path / "a.txt").read_text() == "keep"


def test_demo_settings_are_checked(capsys):
    from cs336_alignment.demo.__main__ import main as demo_main

    for setting, message in [("grpo_lr=-1", "grpo_lr: must be > 0"), ("error_rate=2", "error_rate: must be >= 0"),
                             ("num_heads=5", "num_heads (5) must divide d_model (64)")]:
        assert demo_main(["--preset", "cpu-smoke", "--out-dir", "x", "--set", setting]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "error:" in err


def test_demo_refuses_a_start_file_that_is_not_one(tmp_path, capsys):
    from cs336_alignment.demo.__main__ import main as demo_main

    (tmp_path / "garbage.pt").write_bytes(b"hi\n")
    torch.save({"a": 1}, tmp_path / "other.pt")
    for name, message in [("garbage.pt", "is not a start written by --save-start ("),  # was a KeyError traceback
                          ("other.pt", "is not a start written by --save-start")]:
        assert demo_main(["--preset", "tiny", "--out-dir", str(tmp_path / "out"), "--device", "cpu",
                          "--start-from", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "error:" in err, err
        assert not (tmp_path / "out").exists()  # a refused start leaves no empty output folder behind


@pytest.mark.parametrize("argv, message", [
    (["seeds", "--seeds", "-1"], "--seeds and --seed must be >= 0"),  # each child failed, then 'no run finished'
    (["sweep", "--lrs", "nan"], "--lrs must be positive and finite"),
])
def test_demo_multi_checks_seeds_and_learning_rates_before_launching(tmp_path, capsys, argv, message):
    from cs336_alignment.demo.multi import main as multi_main

    assert multi_main([*argv, "--preset", "tiny", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"multi: error: {message}" and not (tmp_path / "out").exists()


# Class 1: run folders and outputs survive.
def test_a_run_folder_needs_resume_or_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 3.0}\n')
    (out / "config.json").write_text('{"learning_rate": 0.5}\n')
    before = snapshot(out)
    err = one_line_error(capsys, sft_argv(setup, out, "--num-steps", "1"))
    assert "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before
    assert "exclude" in one_line_error(capsys, sft_argv(setup, out, "--num-steps", "1", "--resume", "--overwrite"))
    assert snapshot(out) == before
    main(sft_argv(setup, out, "--num-steps", "1", "--overwrite"))
    capsys.readouterr()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["loss"] != 3.0  # the old run's lines are gone
    assert json.loads((out / "config.json").read_text())["learning_rate"] == 1e-3


def test_eval_outputs_are_not_inputs_and_survive_a_failure(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    results = out / "gsm8k_results.jsonl"
    results.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    before = snapshot(out)
    err = one_line_error(capsys, ["eval", "gsm8k", *model_flags(setup), "--data", str(results), "--out", str(out)])
    assert "would overwrite the input" in err
    assert snapshot(out) == before
    # earlier results are replaced only with --overwrite, and even then not by a run that fails while generating
    # (a prompt longer than the model's context)
    (tmp_path / "long.jsonl").write_text(json.dumps({"question": "Question 1 " * 400, "answer": "#### 1"}) + "\n")
    long_run = ["eval", "gsm8k", *model_flags(setup), "--data", str(tmp_path / "long.jsonl"), "--out", str(out)]
    err = one_line_error(capsys, long_run)
    assert "already holds gsm8k_results.jsonl" in err and "--overwrite" in err
    err = one_line_error(capsys, [*long_run, "--overwrite"])
    assert "leaves no room to generate" in err
    assert snapshot(out) == before


# Class 4 and 1 on the real command: a subprocess, its stderr, the folder after it.
def cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.Popen([sys.executable, "-m", "cs336_alignment", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_real_cli_one_line_error_and_the_run_folder_untouched(setup, tmp_path):
    """Even --overwrite removes the old run only once data and model have loaded."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a"}\n')
    before = snapshot(out)
    proc = cli(sft_argv(setup, out, "--overwrite", data=tmp_path / "bad.jsonl"), tmp_path)  # checked first
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROG) and "bad.jsonl:1 lacks field(s) ['response']" in lines[0]
    assert snapshot(out) == before


# Class 5: SIGINT and SIGTERM stop after a step with a checkpoint; --resume reproduces the uninterrupted run.
def train_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def interrupt_after(proc: subprocess.Popen, metrics: Path, lines: int, signum: int) -> tuple[int, str]:
    """Sends `signum` once `metrics` has at least `lines` lines; returns (exit code, stderr)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= lines:
            proc.send_signal(signum)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def kill_self_after(metrics: Path, lines: int, signum: int) -> threading.Thread:
    """A real signal to this process once `metrics` has `lines` lines (the in-process command's handler gets it)."""
    def watch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= lines:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigint_and_sigterm_checkpoint_and_resume_reproduces_the_run(setup, tmp_path, capsys):
    steps = ["--num-steps", "16"]
    out = tmp_path / "out"
    # SIGINT to the real command: it finishes the step, checkpoints, says so, exits 130
    code, err = interrupt_after(cli(sft_argv(setup, out, *steps), tmp_path), out / "metrics.jsonl", 2,
                                signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err and "SIGINT: stopped after step" in err and "checkpoint.pt" in err
    done = len(train_records(out))
    assert 2 <= done < 16
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == done
    # a run killed while writing leaves half a line: --resume drops it, naming the file
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "kind": "tra')
    # SIGTERM (sent to this process, in-process command: no second torch import) -> 143, checkpointed
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not kill pytest
    try:
        kill_self_after(out / "metrics.jsonl", done + 2, signal.SIGTERM)
        with pytest.warns(UserWarning, match="metrics.jsonl: dropped a half-written last line"), \
                pytest.raises(SystemExit) as exit_info:
            main(sft_argv(setup, out, *steps, "--resume"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 143
    assert "SIGTERM: stopped after step" in capsys.readouterr().err
    later = len(train_records(out))
    assert done < later < 16
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == later
    main(sft_argv(setup, out, *steps, "--resume"))
    main(sft_argv(setup, tmp_path / "ref", *steps))  # the uninterrupted run
    resumed, straight = train_records(out), train_records(tmp_path / "ref")
    assert [r["step"] for r in resumed] == list(range(1, 17))
    assert resumed == straight


def test_grpo_loop_honours_a_stop_request_between_steps(tmp_path):
    """The loops check the request between steps (here raised from inside step 2's reward function): the step
    finishes, the checkpoint records it, no final evaluation is logged."""
    from cs336_alignment.lm import BasicsCausalLM
    from cs336_alignment.testing import basics_tokenizer
    from cs336_alignment.text_tokenizer import BasicsTokenizer

    tokenizer = BasicsTokenizer(basics_tokenizer())
    policy = BasicsCausalLM(tiny_basics_lm(len(tokenizer), context_length=320)).train()
    questions = QuestionSet([f"what is {i} plus 1?" for i in range(4)], [str(i + 1) for i in range(4)])
    config = GRPOConfig(n_grpo_steps=5, rollout_batch_size=4, group_size=2, train_batch_size=4,
                        gradient_accumulation_steps=2, sampling_max_tokens=4, sampling_min_tokens=1,
                        generation_batch_size=8, backend="native", eval_max_tokens=4)
    stop, calls = StopRequest(announce=False), []

    def reward(response: str, truth: str) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 4 + 4 + 2:  # the evaluation at step 0, step 1, then during step 2
            stop.signum = signal.SIGTERM
        return {"reward": float(len(response) % 2), "format_reward": 0.0, "answer_reward": 0.0}

    history = run_grpo(policy, tokenizer, questions, config, eval_questions=questions, out_dir=str(tmp_path),
                       reward_fn=reward, stop=stop)
    assert [h["step"] for h in history if h["kind"] == "train"] == [1, 2]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert [r["kind"] for r in train_records(tmp_path)] == ["eval", "train", "train"]
