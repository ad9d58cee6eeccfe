"""`cs336-basics train` with the model family: every variant's flags, Muon, fp16, the spike guard, MoE
balancing in the loop, presets, one-line errors for bad combinations, and resuming runs saved before the
family's fields existed. Tiny models on random token ids, in-process, on CPU."""

import json

import numpy as np
import pytest
import torch

from cs336_basics.checkpoint import load_checkpoint_state
from cs336_basics.cli import main
from cs336_basics.model import TransformerLM
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)
from cs336_basics.training.config import PRESETS, config_from_preset
from cs336_basics.training.metrics import read_jsonl
from cs336_basics.training.spike_guard import SpikeGuard

VOCAB = 64
TINY = ["--vocab-size", str(VOCAB), "--d-model", "32", "--num-layers", "2", "--num-heads", "4", "--d-ff", "64",
        "--context-length", "16", "--batch-size", "4", "--device", "cpu", "--no-progress", "--log-interval", "1",
        "--eval-interval", "100", "--eval-batches", "1", "--warmup-steps", "2", "--lr-max", "3e-3", "--seed", "1"]
MOE = ["--attention", "mla", "--kv-lora-rank", "16", "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "4",
       "--v-head-dim", "8", "--ffn", "moe", "--num-experts", "4", "--moe-top-k", "2", "--moe-d-ff", "16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    # A learnable stream: each id is mostly the previous one plus one.
    ids = np.cumsum(rng.integers(1, 3, 20_000)) % VOCAB
    np.save(root / "train.npy", ids.astype(np.uint16))
    np.save(root / "val.npy", ids[:2_000].astype(np.uint16))
    return root


def train(data, out_dir, *extra) -> int:
    return main(["train", "--train-data", str(data / "train.npy"), "--val-data", str(data / "val.npy"),
                 "--out-dir", str(out_dir), *TINY, *extra])


def records(run, split="train"):
    return [r for r in read_jsonl(str(run / "metrics.jsonl")) if r["split"] == split]


@pytest.mark.parametrize("variant", [
    ["--num-kv-heads", "2"],
    ["--num-kv-heads", "1", "--sliding-window", "4"],
    ["--position", "alibi"],
    ["--optimizer", "muon"],
    ["--precision", "fp16"],
    MOE,
])
def test_each_variant_trains_and_lowers_the_loss(data, tmp_path, variant):
    assert train(data, tmp_path / "run", "--max-steps", "30", *variant) == 0
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    saved = load_checkpoint_state(str(tmp_path / "run" / "checkpoint.pt"))["extra"]["model_config"]
    flags = dict(zip(variant[::2], variant[1::2], strict=True))
    for flag, value in flags.items():
        field = flag[2:].replace("-", "_")
        if field in saved:
            assert str(saved[field]) == value


def test_fp16_logs_its_loss_scale(data, tmp_path):
    assert train(data, tmp_path / "run", "--max-steps", "3", "--precision", "fp16") == 0
    assert all(r["loss_scale"] > 0 for r in records(tmp_path / "run"))


def test_moe_run_balances_experts_and_logs_their_load(data, tmp_path):
    run = tmp_path / "run"
    assert train(data, run, "--max-steps", "6", *MOE, "--moe-aux-loss-coef", "0.01",
                 "--moe-bias-update-rate", "0.01", "--optimizer", "muon") == 0
    logged = records(run)
    for r in logged:
        assert len(r["moe_load"]) == 2 and all(len(layer) == 4 for layer in r["moe_load"])
        assert all(abs(sum(layer) - 1) < 1e-4 for layer in r["moe_load"])
        assert r["moe_load_max"] == pytest.approx([max(layer) for layer in r["moe_load"]], abs=1e-5)
        assert r["aux_loss"] > 0
    weights = load_checkpoint_state(str(run / "checkpoint.pt"))["model"]
    # six sign updates of ±0.01 (or 0) each: the bias moved, by whole multiples of the rate
    steps = weights["layers.0.ffn.expert_bias"] / 0.01
    assert steps.abs().max() >= 1 and steps.abs().max() <= 6 + 1e-4
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)


def test_bias_update_rate_zero_leaves_the_bias_alone(data, tmp_path):
    assert train(data, tmp_path / "run", "--max-steps", "3", *MOE, "--moe-bias-update-rate", "0") == 0
    weights = load_checkpoint_state(str(tmp_path / "run" / "checkpoint.pt"))["model"]
    assert weights["layers.1.ffn.expert_bias"].abs().max() == 0
    assert "aux_loss" not in records(tmp_path / "run")[0]


def test_resume_of_muon_moe_run_with_guard_reproduces_the_uninterrupted_run(data, tmp_path):
    extra = [*MOE, "--optimizer", "muon", "--spike-guard", "3", "--spike-warmup-steps", "2", "--max-steps", "8",
             "--moe-aux-loss-coef", "0.01"]
    assert train(data, tmp_path / "straight", *extra) == 0
    assert train(data, tmp_path / "split", *extra, "--stop-after-steps", "5") == 0
    assert train(data, tmp_path / "split", *extra, "--resume") == 0
    straight, split = records(tmp_path / "straight"), records(tmp_path / "split")
    np.testing.assert_allclose([r["loss"] for r in split], [r["loss"] for r in straight], rtol=1e-5)
    assert [r["moe_load"] for r in split] == [r["moe_load"] for r in straight]


def test_spike_guard_skips_and_counts_in_the_trainer(data, tmp_path):
    # A multiple barely above 1 rejects every step whose loss or norm is above its average: many skips.
    assert train(data, tmp_path / "run", "--max-steps", "12", "--spike-guard", "1.0001",
                 "--spike-warmup-steps", "2") == 0
    logged = records(tmp_path / "run")
    assert logged[-1]["skipped_steps"] > 0
    assert [r["skipped_steps"] for r in logged] == sorted(r["skipped_steps"] for r in logged)


def test_spike_guard_rule():
    guard = SpikeGuard(multiple=2.0, warmup_steps=3)
    assert all(guard.allows(1.0, 1.0) for _ in range(3))
    assert not guard.allows(2.5, 1.0)  # loss 2.5 > 2 × 1.0
    assert not guard.allows(1.0, 2.5)  # grad norm likewise
    assert guard.allows(1.9, 1.9) and guard.skipped == 2
    assert guard.allows(float("nan"), 1.0)  # left to the scaler / divergence check
    assert SpikeGuard(0.0, 0).allows(1e9, 1e9)  # 0 = off
    early = SpikeGuard(2.0, warmup_steps=5)
    assert early.allows(1.0, 1.0) and early.allows(100.0, 100.0)  # still warming up


@pytest.mark.parametrize("flags, needles", [
    (["--num-kv-heads", "3"], ["--num-kv-heads=3", "--num-heads=4"]),
    (["--num-kv-heads", "0"], ["--num-kv-heads must be >= 1, got 0"]),
    (["--sliding-window", "-2"], ["--sliding-window must be >= 1"]),
    (["--ffn", "moe", "--num-experts", "2", "--moe-top-k", "3"], ["--moe-top-k=3", "--num-experts=2"]),
    (["--attention", "mla", "--position", "none"], ["--position must be 'rope'"]),
    (["--spike-guard", "0.5"], ["--spike-guard must be > 1"]),
])
def test_bad_combinations_are_one_line_errors_naming_the_flag(data, tmp_path, capsys, flags, needles):
    assert train(data, tmp_path / "run", "--max-steps", "1", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cs336-basics train: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not (tmp_path / "run").exists()


def test_optional_flags_clear_a_presets_value():
    from cs336_basics.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--preset", "mistral-swa", "--sliding-window", "none"])
    assert config_from_args(args).sliding_window is None
    assert config_from_args(build_parser().parse_args(["train", "--preset", "mistral-swa"])).sliding_window == 128


def test_a_run_saved_before_the_family_fields_resumes_and_samples(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(data, run, "--max-steps", "4", "--stop-after-steps", "2") == 0
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    old_fields = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta", "norm",
                  "position", "ffn", "use_torch_sdpa", "rmsnorm_eps")
    state["extra"]["model_config"] = {k: state["extra"]["model_config"][k] for k in old_fields}
    torch.save(state, run / "checkpoint.pt")
    assert train(data, run, "--max-steps", "4", "--resume") == 0
    assert records(run)[-1]["step"] == 4
    # and a changed architecture is still refused, naming the field
    assert train(data, run, "--max-steps", "6", "--resume", "--num-kv-heads", "2") == 2
    assert "num_kv_heads" in capsys.readouterr().err


def test_generate_loads_a_family_model(data, tmp_path, capsys):
    from cs336_basics.artifacts import load_trained_model

    run = tmp_path / "run"
    assert train(data, run, "--max-steps", "2", *MOE) == 0
    model = load_trained_model(str(run), "cpu")
    assert model.config.attention == "mla" and len(model.moe_layers()) == 2


def test_family_presets_share_the_budget_and_the_active_size():
    base = config_from_preset("tinystories-17m")
    sizes = {}
    for name in ("tinystories-17m", "llama3-gqa", "mistral-swa", "deepseek-v3-nano"):
        config = config_from_preset(name)
        assert config.max_steps * config.tokens_per_step == base.max_steps * base.tokens_per_step
        with torch.device("meta"):
            model = TransformerLM(config.model_config())
        sizes[name] = model.num_active_parameters(include_embeddings=False)
    assert sizes == {"tinystories-17m": 12_456_448, "llama3-gqa": 12_456_448, "mistral-swa": 12_456_448,
                     "deepseek-v3-nano": 12_309_504}  # the numbers quoted in config.py
    assert config_from_preset("mistral-swa").sliding_window < base.context_length
    assert config_from_preset("llama3-gqa").num_kv_heads == 4
    json.dumps(PRESETS["deepseek-v3-nano"])


def test_model_family_script_runs_tiny_on_cpu(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "model_family.py"
    spec = importlib.util.spec_from_file_location("model_family", path)
    family = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(family)
    report = family.main(["--tiny", "--steps", "4", "--evals", "2", "--device", "cpu", "--workers", "1",
                          "--out-dir", str(tmp_path / "family"), "--json", str(tmp_path / "family.json"),
                          "--figure", str(tmp_path / "family.png")])
    saved = json.loads((tmp_path / "family.json").read_text())
    assert saved == json.loads(json.dumps(report))
    runs = {r["label"]: r for r in saved["runs"]}
    assert list(runs) == ["tinystories-17m", "llama3-gqa", "mistral-swa", "deepseek-v3-nano", "tinystories-17m-muon"]
    assert all(r["val_step"] == [2, 4] and len(r["val_wall_s"]) == 2 for r in runs.values())
    assert len({r["tokens"] for r in runs.values()}) == 1  # one token budget
    kv = {label: r["kv_cache_bytes_per_token"] for label, r in runs.items()}
    # bf16, 2 layers: MHA K+V = 2·2·32·2 bytes; GQA halves it (2 of 4 heads); MLA keeps latent 16 + rope key 4
    assert kv["tinystories-17m"] == 2 * 2 * 32 * 2 and kv["llama3-gqa"] == kv["tinystories-17m"] // 2
    assert kv["deepseek-v3-nano"] == 2 * (16 + 4) * 2
    assert (tmp_path / "family.png").stat().st_size > 1000
