"""`cs336-align sft|ei|grpo|dpo` end to end on a saved tiny cs336_basics run, and their one-line errors."""

import json

import pytest

from cs336_alignment.cli import run
from cs336_alignment.models import load_basics
from cs336_alignment.testing import write_tiny_run
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny cs336_basics run with its tokenizer, and small SFT / MATH-style / preference data."""
    return write_tiny_run(tmp_path_factory.mktemp("loops"))


def common(setup, out):
    return ["--basics-run", str(setup / "run"), "--basics-tokenizer", str(setup / "tok"), "--out-dir", str(out),
            "--device", "cpu"]


def test_sft_command_trains_checkpoints_and_the_result_loads(setup, tmp_path):
    history = run(["sft", *common(setup, tmp_path), "--data", str(setup / "sft.jsonl"), "--num-steps", "2",
                   "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-3"])
    assert [h["step"] for h in history] == [1, 2]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_steps"] == 2 and config["learning_rate"] == 1e-3
    model, _ = load_basics(str(tmp_path), str(setup / "tok"), device="cpu")  # checkpoint records its config
    assert model.config.context_length == 320


def test_grpo_and_ei_commands_with_eval(setup, tmp_path):
    args = ["--data", str(setup / "math.jsonl"), "--eval-data", str(setup / "math.jsonl"), "--eval-max-tokens", "4",
            "--eval-limit", "2"]
    history = run(["grpo", *common(setup, tmp_path / "g"), *args, "--n-grpo-steps", "1", "--rollout-batch-size", "4",
                   "--group-size", "2", "--train-batch-size", "4", "--gradient-accumulation-steps", "2",
                   "--sampling-max-tokens", "4", "--loss-type", "grpo_clip", "--no-use-std-normalization"])
    assert [h["kind"] for h in history] == ["eval", "train", "eval"]
    assert json.loads((tmp_path / "g" / "config.json").read_text())["use_std_normalization"] is False
    history = run(["ei", *common(setup, tmp_path / "e"), *args, "--n-ei-steps", "1", "--ei-batch-size", "2",
                   "--rollouts-per-question", "2", "--sampling-max-tokens", "4", "--train-batch-size", "2",
                   "--gradient-accumulation-steps", "1"])
    assert history[1]["rollouts"] == 4


def test_dpo_command(setup, tmp_path):
    history = run(["dpo", *common(setup, tmp_path), "--data", str(setup / "pairs.jsonl"), "--eval-data",
                   str(setup / "pairs.jsonl"), "--train-batch-size", "4", "--gradient-accumulation-steps", "2",
                   "--num-steps", "1", "--learning-rate", "1e-3"])
    assert history[0]["eval_preference_accuracy"] == 0.0 and history[-1]["kind"] == "eval"


@pytest.mark.parametrize("argv, message", [
    (["grpo", "--train-batch-size", "6", "--gradient-accumulation-steps", "4"], "divisible"),
    (["grpo", "--loss-type", "ppo"], "unknown loss_type"),
    (["sft", "--learning-rate", "0"], "--learning-rate must be > 0"),
    (["dpo", "--optimizer", "sgd"], "optimizer must be"),
    (["grpo", "--data", "/no/such.jsonl"], "does not exist"),
    (["sft", "--resume"], "nothing to resume"),
])
def test_bad_arguments_give_one_line_errors(setup, tmp_path, capsys, argv, message):
    data = {"sft": "sft.jsonl", "grpo": "math.jsonl", "dpo": "pairs.jsonl"}[argv[0]]
    full = [argv[0], *common(setup, tmp_path), "--data", str(setup / data), *argv[1:]]
    with pytest.raises(SystemExit) as exit_info:
        run(full)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("cs336-align: error:")
