"""Issue 25's loss-curve acceptance run, on the CPU: validation under --loss-impl chunked equals the full-logits
validation (the trainer's `evaluate`), the loss-only chunked path equals the training path's loss without
computing gradients, and `benchmarks/leaderboard_curves.py --tiny` writes matching curves, JSON and a figure."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cs336_basics import chunked_ce
from cs336_basics.chunked_ce import chunked_linear_cross_entropy
from cs336_basics.model import TransformerLM
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)
from cs336_basics.training.config import TrainConfig
from cs336_basics.training.trainer import evaluate

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=50, context_length=16, d_model=16, num_layers=2, num_heads=2, d_ff=32)


@pytest.mark.parametrize("precision, rel", [("fp32", 1e-6), ("bf16", 1e-4)])
def test_evaluate_chunked_equals_full_logits(precision, rel, monkeypatch):
    config = TrainConfig(**SHAPE, batch_size=6, eval_batches=3, device="cpu")
    torch.manual_seed(0)
    model = TransformerLM(config.model_config())
    tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], 3_000).astype(np.uint16)
    full = evaluate(model, tokens, config, torch.device("cpu"), precision)
    calls = []
    monkeypatch.setattr(chunked_ce, "chunked_linear_cross_entropy",
                        lambda *a, **k: calls.append(a[3]) or chunked_linear_cross_entropy(*a, **k))
    for chunk in (1, 7, 96, 1_000):  # one token per chunk, uneven tails, exactly one batch, one chunk
        chunked = TrainConfig(**SHAPE, batch_size=6, eval_batches=3, device="cpu", loss_impl="chunked",
                              loss_chunk_tokens=chunk)
        assert evaluate(model, tokens, chunked, torch.device("cpu"), precision) == pytest.approx(full, rel=rel)
    assert calls == [1] * 3 + [7] * 3 + [96] * 3 + [1_000] * 3  # the chunked path ran, per batch
    assert all(p.grad is None for p in model.parameters()) and model.training


@pytest.mark.parametrize("autocast", [False, True])
def test_no_grad_chunked_loss_is_the_training_loss_without_gradients(autocast, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 19, 12, generator=gen, requires_grad=True)
    weight = (torch.randn(40, 12, generator=gen) * 0.3).requires_grad_(True)
    targets = torch.randint(0, 40, (2, 19), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        training = chunked_linear_cross_entropy(hidden, weight, targets, 5)

        def no_gradient(*args):
            raise AssertionError("the loss-only path computed a gradient")

        monkeypatch.setattr(chunked_ce, "chunk_loss_and_grad", no_gradient)
        with torch.no_grad():
            evaluation = chunked_linear_cross_entropy(hidden, weight, targets, 5)
        detached = chunked_linear_cross_entropy(hidden.detach(), weight.detach(), targets, 5)
    assert evaluation.dtype == training.dtype == torch.float32 and not evaluation.requires_grad
    torch.testing.assert_close(evaluation, training.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(detached, training.detach(), rtol=1e-6, atol=1e-6)


def _script():
    spec = importlib.util.spec_from_file_location("leaderboard_curves", ROOT / "benchmarks" / "leaderboard_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(steps_done, train, val):
    return {"steps_done": steps_done, "train_step": list(range(10, steps_done + 1, 10)), "train_loss": train,
            "val_step": [50, 100][:len(val)], "val_loss": val}


def test_compare_takes_the_last_tenth_of_the_common_steps():
    script = _script()
    old = _run(100, [1.0] * 10, [2.0, 1.0])
    new = _run(100, [1.0] * 8 + [1.03, 1.01], [2.5, 1.005])  # early differences do not count
    window = script.compare(old, new, tolerance=0.02)
    assert (window["from_step"], window["to_step"], window["train_points"], window["val_points"]) == (90, 100, 2, 1)
    assert window["max_abs_delta_train"] == pytest.approx(0.03) and window["max_abs_delta_val"] == pytest.approx(0.005)
    assert not window["match"] and script.compare(old, new, tolerance=0.05)["match"]
    short = _run(50, [1.0] * 5, [2.0])  # a run cut by its time limit: the common prefix is compared
    window = script.compare(old, short, tolerance=0.02)
    assert (window["from_step"], window["to_step"], window["val_points"]) == (45, 50, 1) and window["match"]


def test_script_tiny_mode_writes_matching_curves(tmp_path):
    out, figure = tmp_path / "curves.json", tmp_path / "curves.png"
    new_flags = "--loss-impl chunked --loss-chunk-tokens 40 --adamw-impl fused --prefetch"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "leaderboard_curves.py"), "--tiny", "--device", "cpu",
                    "--steps", "12", "--evals", "4", "--new-flags", new_flags, "--out-dir", str(tmp_path / "runs"),
                    "--json", str(out), "--figure", str(figure)],
                   check=True, env=env, timeout=240, capture_output=True)
    report = json.loads(out.read_text())
    old, new = report["runs"]["old"], report["runs"]["new"]
    assert new["flags"] == new_flags and "--loss-impl full" in old["flags"]
    for run in (old, new):
        assert run["steps_done"] == 12 and run["train_step"] == list(range(1, 13))
        assert run["val_step"] == [3, 6, 9, 12] and run["tokens_per_s"] > 0
    # the same function in float32 on the CPU: the curves agree to rounding, all along and at the end
    np.testing.assert_allclose(new["train_loss"], old["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(new["val_loss"], old["val_loss"], rtol=1e-4)
    window = report["last_10pct"]
    assert (window["from_step"], window["to_step"]) == (11, 12) and window["match"]
    assert window["max_abs_delta_train"] < 1e-4 and window["max_abs_delta_val"] < 1e-4
    assert report["data"]["bpe_vocab"] <= 300 and report["data"]["train_tokens"] > 10_000
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_old_run_is_reused_only_from_a_report_of_the_same_training(tmp_path):
    """--old-from: the earlier report's old curve is taken as it is and only the new run trains; a report of
    another schedule (here fewer steps) or other old settings is refused with a message that says what differs."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    base = [sys.executable, str(ROOT / "benchmarks" / "leaderboard_curves.py"), "--tiny", "--device", "cpu",
            "--evals", "2", "--new-flags", "--adamw-impl fused", "--out-dir", str(tmp_path / "runs")]
    first = tmp_path / "first.json"
    subprocess.run([*base, "--steps", "6", "--json", str(first), "--figure", str(tmp_path / "first.png")],
                   check=True, env=env, timeout=240, capture_output=True)
    second = tmp_path / "second.json"
    subprocess.run([*base, "--steps", "6", "--old-from", str(first), "--json", str(second), "--figure",
                    str(tmp_path / "second.png")], check=True, env=env, timeout=240, capture_output=True)
    before, after = json.loads(first.read_text()), json.loads(second.read_text())
    reused = after["runs"]["old"]
    assert reused["reused_from"] == str(first) and after["old_from"] == str(first)
    assert reused["train_loss"] == before["runs"]["old"]["train_loss"]  # taken, not retrained
    assert reused["run_s"] == before["runs"]["old"]["run_s"]
    np.testing.assert_allclose(after["runs"]["new"]["train_loss"], before["runs"]["new"]["train_loss"], rtol=1e-5)
    assert after["last_10pct"]["match"]
    refused = subprocess.run([*base, "--steps", "4", "--old-from", str(first), "--json", str(tmp_path / "x.json"),
                              "--figure", str(tmp_path / "x.png")], env=env, timeout=240, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "steps: 6 there, 4 here" in refused.stderr
    edited = json.loads(first.read_text())
    edited["runs"]["old"]["flags"] = edited["runs"]["old"]["flags"].replace("--adamw-impl ours", "--adamw-impl fused")
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    refused = subprocess.run([*base, "--steps", "6", "--old-from", str(tmp_path / "edited.json"), "--json",
                              str(tmp_path / "y.json"), "--figure", str(tmp_path / "y.png")], env=env, timeout=240,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "old flags" in refused.stderr
