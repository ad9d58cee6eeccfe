"""The `cs336-basics` command line end to end on tiny generated data, run in-process."""

import json
import os

import numpy as np
import pytest
import torch

from cs336_basics.cli import main
from cs336_basics.corpus import write_corpus
from cs336_basics.model import TransformerLM
from cs336_basics.training.metrics import read_jsonl

TINY_MODEL = ["--d-model", "32", "--num-layers", "1", "--num-heads", "2", "--d-ff", "64", "--context-length", "16",
              "--batch-size", "4", "--log-interval", "1", "--eval-interval", "4", "--eval-batches", "2",
              "--device", "cpu", "--no-progress", "--lr-max", "3e-3", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_corpus(str(root / "train.txt"), num_stories=200, seed=0)
    write_corpus(str(root / "val.txt"), num_stories=30, seed=1)
    assert main(["train-tokenizer", "--input", str(root / "train.txt"), "--vocab-size", "320",
                 "--out-dir", str(root / "tok")]) == 0
    for split in ("train", "val"):
        assert main(["encode", "--tokenizer", str(root / "tok"), "--input", str(root / f"{split}.txt"),
                     "--output", str(root / f"{split}.npy")]) == 0
    return root


def test_encode_writes_the_tokenizers_ids(encoded):
    from cs336_basics.tokenizer import Tokenizer

    tokens = np.load(encoded / "train.npy")
    assert tokens.dtype == np.uint16
    tokenizer = Tokenizer.from_files(str(encoded / "tok" / "vocab.json"), str(encoded / "tok" / "merges.txt"),
                                     ["<|endoftext|>"])
    text = (encoded / "train.txt").read_text()
    assert tokens.tolist() == tokenizer.encode(text)
    assert tokenizer.decode(tokens.tolist()) == text


def test_parallel_encoding_equals_single_process(encoded, tmp_path):
    from cs336_basics.encode import encode_file
    from cs336_basics.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_files(str(encoded / "tok" / "vocab.json"), str(encoded / "tok" / "merges.txt"),
                                     ["<|endoftext|>"])
    encode_file(tokenizer, str(encoded / "train.txt"), str(tmp_path / "par.npy"), num_workers=2)
    np.testing.assert_array_equal(np.load(tmp_path / "par.npy"), np.load(encoded / "train.npy"))


def _train(encoded, out_dir, *extra):
    return main(["train", "--train-data", str(encoded / "train.npy"), "--val-data", str(encoded / "val.npy"),
                 "--vocab-size", "320", "--out-dir", str(out_dir), "--max-steps", "8", *TINY_MODEL, *extra])


def test_resume_reproduces_the_uninterrupted_run(encoded, tmp_path):
    assert _train(encoded, tmp_path / "straight") == 0
    assert _train(encoded, tmp_path / "split", "--stop-after-steps", "5") == 0
    assert _train(encoded, tmp_path / "split", "--resume") == 0

    def losses(run):
        return [(r["step"], r["split"], r["loss"]) for r in read_jsonl(str(tmp_path / run / "metrics.jsonl"))]

    straight, split = losses("straight"), losses("split")
    assert [r[:2] for r in split] == [r[:2] for r in straight]
    np.testing.assert_allclose([r[2] for r in split], [r[2] for r in straight], rtol=1e-6)
    assert straight[-1][:2] == (8, "val")


def test_training_lowers_the_loss_and_generate_samples_text(encoded, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(encoded, run, "--max-steps", "60", "--eval-interval", "60") == 0
    records = read_jsonl(str(run / "metrics.jsonl"))
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5]) - 0.5
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(run), "--tokenizer", str(encoded / "tok"), "--prompt", "Once upon",
                 "--prompt", "Tom", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "### Once upon" in printed and "### Tom" in printed
    assert main(["plot", "--runs", str(run), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_bad_inputs_give_one_line_errors(encoded, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-tokenizer", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out-dir", "x"])
    assert exit_info.value.code == 2
    assert "no such file" in capsys.readouterr().err

    assert main(["encode", "--tokenizer", str(tmp_path), "--input", str(encoded / "val.txt"),
                 "--output", str(tmp_path / "o.npy")]) == 2
    assert "vocab.json" in capsys.readouterr().err

    assert _train(encoded, tmp_path / "small-vocab", "--vocab-size", "100") == 2
    err = capsys.readouterr().err
    assert "vocab_size=100" in err and len(err.strip().splitlines()) == 1

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert _train(encoded, tmp_path / "broken", "--resume") == 2
    assert "error" in capsys.readouterr().err

    assert main(["train", "--train-data", str(encoded / "train.npy"), "--val-data", str(encoded / "val.npy"),
                 "--out-dir", str(tmp_path / "r"), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_presets_carry_the_handout_budget():
    from cs336_basics.training.config import config_from_preset

    config = config_from_preset("tinystories-17m")
    assert config.max_steps * config.tokens_per_step == 327_680_000
    with torch.device("meta"):
        model = TransformerLM(config.model_config())
    # The handout's "≈17M non-embedding parameters" counts the LM head but not the input embedding.
    assert 17e6 < model.num_parameters() - model.token_embeddings.weight.numel() < 18e6
    json.dumps(config.__dict__)  # serialisable for config.json
    assert os.path.basename(config.out_dir) == "default"


def test_ablation_sweep_trains_each_variant_and_draws_one_figure(encoded, tmp_path):
    assert main(["sweep", "ablations", "--preset", "quickstart", "--out-root", str(tmp_path / "sweeps"),
                 "--figure", str(tmp_path / "ablations.png"), "--train-data", str(encoded / "train.npy"),
                 "--val-data", str(encoded / "val.npy"), "--vocab-size", "320", "--max-steps", "4",
                 *TINY_MODEL]) == 0
    summary = json.loads((tmp_path / "sweeps" / "ablations" / "summary.json").read_text())
    assert set(summary) == {"baseline", "no-rmsnorm", "post-norm", "nope", "silu-ffn"}
    assert all(np.isfinite(r["val_loss"]) for r in summary.values())
    assert (tmp_path / "ablations.png").stat().st_size > 1000


def test_a_sweep_over_an_earlier_sweep_is_refused_before_any_variant_trains(encoded, tmp_path, capsys):
    args = ["sweep", "lr", "--values", "1e-3", "3e-3", "--preset", "quickstart", "--out-root", str(tmp_path / "s"),
            "--figure", str(tmp_path / "lr.png"), "--train-data", str(encoded / "train.npy"),
            "--val-data", str(encoded / "val.npy"), "--vocab-size", "320", "--max-steps", "2", *TINY_MODEL]
    assert main(args) == 0
    first = tmp_path / "s" / "lr" / "lr_1e-3"
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    for name in ("metrics.jsonl", "checkpoint.pt"):  # only the later variant still holds a run
        (first / name).unlink()
        del before[first / name]
    assert main(args) == 2
    assert "--resume to continue it or --overwrite" in capsys.readouterr().err
    assert not (first / "metrics.jsonl").exists()  # refused up front: the first variant did not train again
    assert {p: p.read_bytes() for p in before} == before
