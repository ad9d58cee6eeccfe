"""The training loops end to end on tiny random-weight cs336_basics models (CPU, offline).

Each loop is checked against quantities computed here independently of the loop and of the primitives it
uses: response log-likelihoods by a plain full forward + log_softmax over concatenated token ids, DPO losses
by the per-instance reference `per_instance_dpo_loss`, and exact state-dict equality for resumption.
"""

import copy
import json

import pytest
import torch

from cs336_alignment.dpo import per_instance_dpo_loss
from cs336_alignment.generation import Completion, NativeBackend, SamplingParams
from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.rollouts import sample_rollouts
from cs336_alignment.sft_data import PackedSFTDataset
from cs336_alignment.testing import basics_tokenizer, tiny_basics_lm
from cs336_alignment.text_tokenizer import BasicsTokenizer
from cs336_alignment.tokenization import tokenize_prompt_and_output
from cs336_alignment.training import (
    DPOConfig,
    EIConfig,
    GRPOConfig,
    InstructionSFTConfig,
    SFTConfig,
    run_dpo,
    run_expert_iteration,
    run_grpo,
    run_instruction_sft,
    run_sft,
)
from cs336_alignment.training.common import epoch_order
from cs336_alignment.training.dpo_loop import dpo_batch
from cs336_alignment.training.eval_config import QuestionSet
from cs336_alignment.training.grpo_loop import grpo_train_on_rollouts
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)

PROMPTS = [f"Question {i}: what is {i} plus {i + 3}?" for i in range(8)]
GOOD, BAD = " Answer: <answer> 7 </answer>", " The quick brown fox"


@pytest.fixture(scope="module")
def tok():
    return BasicsTokenizer(basics_tokenizer())


def make_policy(tok, seed=0):
    return BasicsCausalLM(tiny_basics_lm(len(tok), seed=seed, context_length=96)).train()


def ref_logprob(policy, tok, prompt, response):
    """Σ log p(response tokens | prefix): one forward of the raw TransformerLM on prompt+response ids."""
    p, r = tok.encode(prompt), tok.encode(response)
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(ids).double(), dim=-1)[0]
    return sum(float(logp[len(p) + i - 1, t]) for i, t in enumerate(r))


def per_token(policy, tok, prompt, response):
    return ref_logprob(policy, tok, prompt, response) / len(tok.encode(response))


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ---- SFT -------------------------------------------------------------------------------------------------

def _sft_examples():
    return [{"prompt": p, "response": f" Answer: {2 * i + 3}."} for i, p in enumerate(PROMPTS[:4])]


def test_sft_step_logs_the_batch_nll_and_raises_likelihood(tok, tmp_path):
    policy = make_policy(tok)
    examples = _sft_examples()
    before = [ref_logprob(policy, tok, e["prompt"], e["response"]) for e in examples]
    config = SFTConfig(learning_rate=3e-3, train_batch_size=4, gradient_accumulation_steps=2, num_steps=1)
    history = run_sft(policy, tok, examples, config, out_dir=str(tmp_path))
    after = [ref_logprob(policy, tok, e["prompt"], e["response"]) for e in examples]
    # The logged loss is the mean summed NLL of the batch (accumulated over two micro-batches).
    assert history[0]["loss"] == pytest.approx(-sum(before) / 4, rel=1e-4)
    assert sum(after) > sum(before)
    assert (tmp_path / "checkpoint.pt").is_file() and read_metrics(tmp_path)[0]["step"] == 1


def test_sft_resume_is_exact(tok, tmp_path):
    examples = _sft_examples()
    config = SFTConfig(learning_rate=1e-3, train_batch_size=2, gradient_accumulation_steps=1, num_steps=4)
    straight = make_policy(tok)
    run_sft(straight, tok, examples, config, out_dir=str(tmp_path / "a"))
    resumed = make_policy(tok)
    run_sft(resumed, tok, examples, SFTConfig(**{**config.__dict__, "num_steps": 2}), out_dir=str(tmp_path / "b"))
    fresh = make_policy(tok)  # a new process would start from fresh weights and load the checkpoint
    run_sft(fresh, tok, examples, config, out_dir=str(tmp_path / "b"), resume=True)
    assert states_equal(straight, fresh)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_instruction_sft_on_packed_sequences_lowers_the_loss(tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": f"Answer: {i}."}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    dataset = PackedSFTDataset(tok, path, seq_length=32, shuffle=True, seed=0)
    model = make_policy(tok)

    def nll():
        with torch.no_grad():
            logp = torch.log_softmax(model.model(dataset.input_ids).double(), dim=-1)
            return -logp.gather(-1, dataset.labels.unsqueeze(-1)).mean().item()

    before = nll()
    config = InstructionSFTConfig(learning_rate=3e-3, seq_length=32, train_batch_size=4,
                                  gradient_accumulation_steps=2, num_steps=4, warmup_ratio=0.0)
    history = run_instruction_sft(model, dataset, config)
    assert len(history) == 4 and nll() < before - 0.1


# ---- expert iteration ----------------------------------------------------------------------------------

def test_ei_round_keeps_only_rewarded_samples_and_fits_them(tok):
    policy = make_policy(tok, seed=3)
    initial = copy.deepcopy(policy)
    graded: list[tuple[str, str, float]] = []

    def reward(response, truth):  # a checkable stand-in for correctness: even character count
        value = float(len(response) % 2 == 0)
        graded.append((response, truth, value))
        return {"reward": value}

    questions = QuestionSet(PROMPTS[:4], ["7"] * 4)
    config = EIConfig(n_ei_steps=1, ei_batch_size=4, rollouts_per_question=4, sampling_max_tokens=6,
                      learning_rate=3e-3, train_batch_size=4, gradient_accumulation_steps=2, sft_epochs=2)
    history = run_expert_iteration(policy, tok, questions, config, reward_fn=reward)
    record = history[0]
    rewarded = {r for r, _, v in graded if v == 1.0}
    assert record["rollouts"] == 16 and 0 < record["kept"] <= len(rewarded)
    assert record["sft_steps"] == (2 * record["kept"]) // min(4, record["kept"])
    # Rollouts are seeded by (seed, round): resampling the initial policy recovers the round's samples.
    params = SamplingParams(max_tokens=6, min_tokens=4, stop=("</answer>",), include_stop_str_in_output=True,
                            seed=0)
    order = epoch_order(4, 0, 4, 0)
    again = sample_rollouts(NativeBackend(initial, tok, 64), [questions.prompts[i] for i in order], ["7"] * 4, 4,
                            params)
    kept = [(p, r) for p, r in zip(again.prompts, again.responses, strict=True) if len(r) % 2 == 0]
    assert len(set(kept)) == record["kept"]
    gain = sum(ref_logprob(policy, tok, p, r) - ref_logprob(initial, tok, p, r) for p, r in set(kept))
    assert gain > 0


# ---- GRPO ----------------------------------------------------------------------------------------------

class FixedBackend:
    """Each prompt's group alternates a rewarded and an unrewarded response; counts pushed weights."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        return [Completion(i, GOOD if j % 2 == 0 else BAD, [0], "stop") for i in range(len(prompts))
                for j in range(params.n)]


def contains_answer(response, truth):
    value = float("<answer>" in response)
    return {"reward": value, "format_reward": value, "answer_reward": value}


def gap(policy, tok):
    return sum(per_token(policy, tok, p, GOOD) - per_token(policy, tok, p, BAD) for p in PROMPTS[:4]) / 4


@pytest.mark.parametrize("loss_type", ["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"])
def test_one_grpo_step_of_each_loss_type_favours_the_rewarded_response(tok, loss_type):
    policy = make_policy(tok, seed=1)
    before = gap(policy, tok)
    backend = FixedBackend()
    config = GRPOConfig(n_grpo_steps=1, learning_rate=3e-3, rollout_batch_size=8, group_size=4, train_batch_size=8,
                        gradient_accumulation_steps=2, loss_type=loss_type, sampling_max_tokens=8)
    history = run_grpo(policy, tok, QuestionSet(PROMPTS[:4], ["7"] * 4), config, backend=backend,
                       reward_fn=contains_answer)
    record = history[0]
    assert backend.calls == 1 and record["optimizer_steps"] == 1
    assert record["reward_mean"] == 0.5 and record["format_reward_mean"] == 0.5
    if loss_type in ("grpo_clip", "grpo_no_clip"):  # on-policy first step: pi == pi_old, nothing clipped
        assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and record["clip_fraction"] == 0.0
    assert gap(policy, tok) > before + 0.05


def test_off_policy_epochs_reuse_old_log_probs_and_clip(tok):
    policy = make_policy(tok, seed=2)
    before = gap(policy, tok)
    prompts = [p for p in PROMPTS[:4] for _ in range(4)]
    responses = [GOOD if j % 2 == 0 else BAD for _ in range(4) for j in range(4)]
    batch = tokenize_prompt_and_output(prompts, responses, tok)
    raw = torch.tensor([1.0 if r == GOOD else 0.0 for r in responses])
    advantages = raw - 0.5
    config = GRPOConfig(rollout_batch_size=16, group_size=4, train_batch_size=8, gradient_accumulation_steps=2,
                        epochs_per_rollout_batch=2, loss_type="grpo_clip", cliprange=0.05, learning_rate=1e-2)
    config.validate()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    updates = grpo_train_on_rollouts(policy, optimizer, batch, advantages, raw, config, seed=0)
    assert len(updates) == 4  # 2 epochs x 2 train batches
    assert updates[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # first update: still on-policy
    # pi_old stays the pre-update policy: later ratios move away from 1 and some tokens hit the clip.
    assert any(abs(u["ratio_mean"] - 1) > 1e-3 for u in updates[1:])
    assert max(u["clip_fraction"] for u in updates[1:]) > 0
    assert gap(policy, tok) > before


def test_off_policy_without_importance_weights_is_refused():
    with pytest.raises(ValueError, match="importance"):
        GRPOConfig(rollout_batch_size=16, group_size=4, train_batch_size=8, gradient_accumulation_steps=2,
                   epochs_per_rollout_batch=2, loss_type="reinforce_with_baseline").validate()


def test_grpo_defaults_are_the_handouts():
    c = GRPOConfig()
    assert (c.n_grpo_steps, c.learning_rate, c.advantage_eps, c.rollout_batch_size, c.group_size) == \
        (200, 1e-5, 1e-6, 256, 8)
    assert (c.sampling_temperature, c.sampling_min_tokens, c.sampling_max_tokens) == (1.0, 4, 1024)
    assert (c.epochs_per_rollout_batch, c.train_batch_size, c.gradient_accumulation_steps) == (1, 256, 128)
    assert (c.gpu_memory_utilization, c.loss_type, c.use_std_normalization) == (0.85, "reinforce_with_baseline", True)
    assert (c.weight_decay, c.adam_beta1, c.adam_beta2) == (0.0, 0.9, 0.95)
    c.validate()


def length_parity(response, truth):
    return {"reward": float(len(response) % 2 == 0)}


def test_grpo_with_native_rollouts_resumes_exactly_and_logs(tok, tmp_path):
    questions = QuestionSet(PROMPTS[:4], ["7"] * 4)
    config = GRPOConfig(n_grpo_steps=2, learning_rate=1e-3, rollout_batch_size=8, group_size=4, train_batch_size=8,
                        gradient_accumulation_steps=2, loss_type="grpo_clip", sampling_max_tokens=6,
                        length_normalization="masked_normalize", eval_max_tokens=6)
    straight = make_policy(tok, seed=5)
    history = run_grpo(straight, tok, questions, config, eval_questions=questions, out_dir=str(tmp_path / "a"),
                       reward_fn=length_parity)
    evals = [h for h in history if h["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2] and evals[0]["n"] == 4
    train = [h for h in history if h["kind"] == "train"]
    for key in ("reward_mean", "token_entropy", "clip_fraction", "response_length", "grad_norm"):
        assert all(key in r for r in train)
    part = make_policy(tok, seed=5)
    run_grpo(part, tok, questions, GRPOConfig(**{**config.__dict__, "n_grpo_steps": 1}),
             out_dir=str(tmp_path / "b"), reward_fn=length_parity)
    fresh = make_policy(tok, seed=5)
    run_grpo(fresh, tok, questions, config, out_dir=str(tmp_path / "b"), resume=True, reward_fn=length_parity)
    assert states_equal(straight, fresh)
    a = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "train"]
    b = [r for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    assert (tmp_path / "a" / "generations.jsonl").is_file()


# ---- DPO -----------------------------------------------------------------------------------------------

PAIRS = [{"prompt": f"what is {i} plus 3?", "chosen": f"It is {i + 3}.", "rejected": "The quick brown fox."}
         for i in range(4)]


def test_batched_dpo_matches_the_per_instance_loss(tok):
    policy, reference = make_policy(tok, seed=1), make_policy(tok, seed=2)
    losses, margins = dpo_batch(policy, reference, tok, PAIRS, beta=0.5)
    for pair, loss in zip(PAIRS, losses, strict=True):
        expected = per_instance_dpo_loss(policy, reference, tok, 0.5, pair["prompt"], pair["chosen"],
                                         pair["rejected"])
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert torch.equal(margins > 0, losses < torch.log(torch.tensor(2.0)))


def test_dpo_step_lowers_the_loss_and_leaves_the_reference_alone(tok, tmp_path):
    policy = make_policy(tok, seed=4)
    reference = copy.deepcopy(policy).eval()
    frozen = copy.deepcopy(reference)
    before = float(torch.stack([per_instance_dpo_loss(policy, reference, tok, 0.1, p["prompt"], p["chosen"],
                                                      p["rejected"]).detach() for p in PAIRS]).mean())
    config = DPOConfig(learning_rate=1e-3, optimizer="rmsprop", train_batch_size=4, gradient_accumulation_steps=2,
                       num_steps=2)
    history = run_dpo(policy, tok, PAIRS, config, eval_pairs=PAIRS, out_dir=str(tmp_path), reference=reference)
    after = float(torch.stack([per_instance_dpo_loss(policy, reference, tok, 0.1, p["prompt"], p["chosen"],
                                                     p["rejected"]).detach() for p in PAIRS]).mean())
    assert before == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)  # policy == reference
    assert after < before and states_equal(reference, frozen)
    evals = [h for h in history if h["kind"] == "eval"]
    assert evals[0]["eval_preference_accuracy"] == 0.0 and evals[-1]["eval_preference_accuracy"] == 1.0
    assert evals[-1]["eval_loss"] == pytest.approx(after, rel=1e-4)
