"""The API's model variant and the real trainer, on CPU with generated tokens (a few steps)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cs336_scaling.api_spec import RunConfig
from cs336_scaling.model import APIModelConfig, APITransformerLM
from cs336_scaling.trainer import RealTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def tokens(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tokens.npy"
    np.save(path, (np.arange(20_000) % 17 + rng.integers(0, 3, 20_000)).astype(np.uint16))  # learnable pattern
    return str(path)


def test_model_variant_shape_and_parameter_count():
    config = APIModelConfig(vocab_size=100, context_length=16, d_model=32, num_layers=3, num_heads=4)
    model = APITransformerLM(config)
    matrices = sum(p.numel() for name, p in model.named_parameters()
                   if p.ndim == 2 and "embeddings" not in name and "lm_head" not in name)
    assert matrices == config.non_embedding_params == 12 * 3 * 32**2  # attention 4d², GeLU FFN 8d² (d_ff = 4d)
    assert not any("bias" in name for name, _ in model.named_parameters())
    assert model.lm_head.weight.data_ptr() != model.token_embeddings.weight.data_ptr()  # untied
    assert isinstance(model.layers[0].ln1, torch.nn.LayerNorm)
    x = torch.randint(0, 100, (2, 16))
    assert model(x).shape == (2, 16, 100)
    with pytest.raises(ValueError, match="divisible"):
        APIModelConfig(100, 16, 30, 2, 4)


def test_model_is_causal_and_dropout_only_in_training():
    torch.manual_seed(0)
    model = APITransformerLM(APIModelConfig(50, 12, 32, 2, 2)).eval()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 50
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_real_trainer_few_steps_on_cpu(tokens):
    trainer = RealTrainer(tokens, vocab_size=32, context_length=32, device="cpu", eval_batches=2, max_steps=40)
    run = RunConfig(d_model=64, num_layers=2, num_heads=2, batch_size=128, learning_rate=1e-3,
                    train_flops=int(1e13))
    result = trainer.train(run)
    assert result["steps"] == 40 and result["device"] == "cpu"
    assert math_finite(result["loss"]) and result["loss"] < np.log(32)  # learned something beyond uniform
    with pytest.raises(ValueError, match="vocab_size"):
        RealTrainer(tokens, vocab_size=8, context_length=32, device="cpu", max_steps=1)(run)


def math_finite(x: float) -> bool:
    return bool(np.isfinite(x))


def test_train_cli(tokens, capsys):
    from cs336_scaling.cli import main

    assert main(["train", "--train-flops", "1e9", "--tokens", tokens, "--vocab-size", "32", "--context-length", "32",
                 "--device", "cpu", "--eval-batches", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["steps"] >= 1 and np.isfinite(row["loss"]) and row["d_model"] == 128


def test_profile_cli_without_fastapi(tokens, tmp_path):
    """`python -m cs336_scaling` with PYTHONPATH only, as on the GPU machine; fastapi/uvicorn never imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "assignment1-basics"),
                                                        os.path.join(ROOT, "assignment3-scaling")])}
    code = ("import runpy, sys; sys.argv = ['cs336_scaling'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('cs336_scaling', run_name='__main__')\n"
            "finally:\n    assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules")
    results = tmp_path / "profile.jsonl"
    subprocess.run([sys.executable, "-c", code, "profile", "--budgets", "2e9", "6e9", "--shapes", "64x2x2",
                    "--results", str(results), "--figure-prefix", str(tmp_path / "real"),
                    "--tokens", tokens, "--vocab-size", "32", "--context-length", "32", "--device", "cpu",
                    "--eval-batches", "1"], env=env, capture_output=True, text=True, timeout=120, check=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "real_profiles.png").exists() and (tmp_path / "real_n_opt.png").exists()
