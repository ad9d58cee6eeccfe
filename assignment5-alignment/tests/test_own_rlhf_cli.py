"""`cs336-align orpo|ppo|reward-model` and the LoRA/QLoRA flags end to end on a saved tiny cs336_basics run, and
their one-line errors."""

import copy
import json

import pytest
import torch

from cs336_alignment.cli import run
from cs336_alignment.models import load_basics
from cs336_alignment.peft import LoRAConfig
from cs336_alignment.testing import write_tiny_run
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("rlhf"))


def common(setup, out):
    return ["--basics-run", str(setup / "run"), "--basics-tokenizer", str(setup / "tok"), "--out-dir", str(out),
            "--device", "cpu"]


PAIR_STEP = ["--train-batch-size", "4", "--gradient-accumulation-steps", "2", "--num-steps", "1",
             "--learning-rate", "1e-3"]


def test_reward_model_then_ppo_with_it(setup, tmp_path):
    history = run(["reward-model", *common(setup, tmp_path / "rm"), "--data", str(setup / "pairs.jsonl"),
                   "--eval-data", str(setup / "pairs.jsonl"), *PAIR_STEP])
    assert [h["kind"] for h in history] == ["eval", "train", "eval"] and "eval_accuracy" in history[-1]
    info = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert info["basics_run"].endswith("run") and info["lora"] is None
    history = run(["ppo", *common(setup, tmp_path / "ppo"), "--data", str(setup / "math.jsonl"), "--reward", "model",
                   "--reward-model", str(tmp_path / "rm"), "--n-ppo-steps", "1", "--rollout-batch-size", "4",
                   "--samples-per-prompt", "2", "--train-batch-size", "2", "--gradient-accumulation-steps", "1",
                   "--ppo-epochs", "1", "--sampling-max-tokens", "4"])
    assert history[0]["kind"] == "train" and history[0]["optimizer_steps"] == 2


def test_orpo_with_lora_saves_adapters_and_a_merged_run(setup, tmp_path):
    history = run(["orpo", *common(setup, tmp_path), "--data", str(setup / "pairs.jsonl"), *PAIR_STEP,
                   "--lora-rank", "2", "--lora-targets", "q_proj", "w2"])
    assert history[-1]["kind"] == "train"
    from safetensors.torch import load_file

    adapters = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(adapters) == 2 * 2 * 2 and all(k.endswith(("lora_A", "lora_B")) for k in adapters)
    assert LoRAConfig.load(tmp_path / "adapter").rank == 2
    model, _ = load_basics(str(tmp_path / "merged"), str(setup / "tok"), device="cpu")  # a plain run again
    assert model.config.context_length == 320


def test_sft_with_qlora_and_reward_model_with_lora(setup, tmp_path):
    history = run(["sft", *common(setup, tmp_path / "q"), "--data", str(setup / "sft.jsonl"), "--num-steps", "1",
                   "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--lora-rank", "4", "--qlora"])
    assert history[0]["kind"] == "train"
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "q" / "merged").exists()  # 4-bit weights are not merged
    run(["reward-model", *common(setup, tmp_path / "rm"), "--data", str(setup / "pairs.jsonl"), *PAIR_STEP,
         "--lora-rank", "2"])
    from cs336_alignment.training.commands import load_reward_model

    reward_model, _ = load_reward_model(str(tmp_path / "rm"), device="cpu")
    trained = torch.load(tmp_path / "rm" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(reward_model.state_dict()[k], v) for k, v in trained.items())


@pytest.mark.parametrize("argv, message", [
    (["sft", "--lora-rank", "0"], "--lora-rank must be a positive integer"),
    (["sft", "--lora-rank", "-3"], "--lora-rank must be a positive integer"),
    (["orpo", "--lora-rank", "2", "--lora-targets", "attn.qproj"], "match no linear layer"),
    (["sft", "--lora-rank", "2", "--qlora", "--lora-targets", "lm_head"],
     "--qlora: 4-bit NF4 cannot store model.lm_head of shape (401, 32): 12832 values are not a multiple of the "
     "block size 64"),
    (["sft", "--qlora"], "--qlora needs --lora-rank"),
    (["ppo", "--reward", "model"], "--reward model needs --reward-model"),
    (["ppo", "--reward", "human"], "--reward must be one of"),
    (["grpo", "--loss-type", "gspo", "--length-normalization", "masked_normalize"], "needs --length-normalization"),
    (["orpo", "--orpo-lambda", "-1"], "--orpo-lambda must be >= 0"),
    (["grpo", "--lora-rank", "4", "--backend", "vllm"], "--lora-rank cannot be used with --backend vllm"),
])
def test_bad_arguments_give_one_line_errors(setup, tmp_path, capsys, argv, message):
    data = {"sft": "sft.jsonl", "grpo": "math.jsonl", "ppo": "math.jsonl", "orpo": "pairs.jsonl"}[argv[0]]
    with pytest.raises(SystemExit) as exit_info:
        run([argv[0], *common(setup, tmp_path), "--data", str(setup / data), *argv[1:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("cs336-align: error:"), err


def test_peft_memory_benchmark_tiny(tmp_path):
    """`benchmarks/peft_memory.py --tiny`: the whole benchmark path on CPU; the byte counts order as they must."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peft_memory.py"
    spec = importlib.util.spec_from_file_location("peft_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--tiny", "--out", str(tmp_path / "pm.json")])
    assert json.loads((tmp_path / "pm.json").read_text()) == json.loads(json.dumps(report))
    full, lora, qlora = (next(r for r in report["results"] if r["method"] == m) for m in ("full", "lora", "qlora"))
    assert lora["trainable_params"] == qlora["trainable_params"] < full["trainable_params"] / 2
    assert qlora["weights_bytes"] < lora["weights_bytes"]
    assert lora["optimizer_state_bytes"] == qlora["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert full["total_params"] == lora["total_params"] - lora["trainable_params"]
    assert lora["first_loss"] == full["first_loss"]  # B = 0: the adapted model starts as the base model
    assert abs(qlora["first_loss"] - full["first_loss"]) < 0.05


def test_lora_on_a_hugging_face_model_saves_a_merged_model_equal_to_base_plus_adapters(tmp_path):
    from cs336_alignment.models import load_hf
    from cs336_alignment.peft import load_adapters
    from cs336_alignment.testing import hf_tokenizer, tiny_llama

    tokenizer = hf_tokenizer()
    tiny_llama(len(tokenizer), seed=3).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"what is {i} plus 3?", "response": f" {i + 3}"})
                                                + "\n" for i in range(4)))
    run(["sft", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "sft.jsonl"), "--out-dir",
         str(tmp_path / "out"), "--device", "cpu", "--num-steps", "2", "--train-batch-size", "2",
         "--gradient-accumulation-steps", "1", "--learning-rate", "1e-2", "--lora-rank", "2",
         "--lora-targets", "q_proj", "down_proj"])
    merged, _ = load_hf(str(tmp_path / "out" / "model"), device="cpu", dtype="float32")
    base, _ = load_hf(str(tmp_path / "base"), device="cpu", dtype="float32")
    assert merged.state_dict().keys() == base.state_dict().keys()  # a plain model again
    original = copy.deepcopy(base)
    load_adapters(base, tmp_path / "out" / "adapter")
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        adapted, plain, before = base(ids).logits, merged(ids).logits, original(ids).logits
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)
    assert (plain - before).abs().max() > 1e-4  # training moved the adapters off B = 0
