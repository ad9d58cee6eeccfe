"""The reward-model, ORPO, PPO and GSPO loops on tiny random cs336_basics LMs (CPU, offline).

Quantities are recomputed here independently of the loops: rewards and likelihoods by running the raw
TransformerLM on each sequence alone (no padding, no batching), and exact state equality for PPO's resume.
"""

import copy
import json

import pytest
import torch

from cs336_alignment.dpo import preference_sequence
from cs336_alignment.generation import Completion
from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.orpo import orpo_batch
from cs336_alignment.peft import LoRAConfig, inject_lora, lora_disabled
from cs336_alignment.prompts import format_prompt
from cs336_alignment.reward_model import RewardModel, ValueHead, reward_model_batch
from cs336_alignment.testing import basics_tokenizer, tiny_basics_lm
from cs336_alignment.text_tokenizer import BasicsTokenizer
from cs336_alignment.training import (
    GRPOConfig,
    ORPOConfig,
    PPOConfig,
    RewardModelConfig,
    run_grpo,
    run_orpo,
    run_ppo,
    run_reward_model,
)
from cs336_alignment.training.eval_config import QuestionSet
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)


@pytest.fixture(scope="module")
def tok():
    return BasicsTokenizer(basics_tokenizer())


def make_policy(tok, seed=0):
    return BasicsCausalLM(tiny_basics_lm(len(tok), seed=seed, context_length=96)).train()


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


PAIRS = [{"prompt": f"what is {i} plus 3?", "chosen": f"It is {i + 3}.", "rejected": "The quick brown fox."}
         for i in range(8)]


# ---- reward model --------------------------------------------------------------------------------------

def reward_alone(rm: RewardModel, tok, prompt: str, response: str) -> float:
    """The head on the final hidden state of the last token, running the raw LM's blocks on this sequence."""
    lm = rm.backbone.model
    ids = torch.tensor([preference_sequence(tok, prompt, response)])
    with torch.no_grad():
        x = lm.token_embeddings(ids)
        for layer in lm.layers:
            x = layer(x)
        h = lm.ln_final(x)[0, -1].double()
        return float(h @ rm.value_head.proj.weight[0].double() + rm.value_head.proj.bias.double())


def test_reward_model_batch_matches_sequences_scored_alone(tok):
    rm = RewardModel(make_policy(tok, seed=1))
    losses, chosen, rejected = reward_model_batch(rm, tok, PAIRS[:3])
    for pair, c, r, loss in zip(PAIRS[:3], chosen, rejected, losses, strict=True):
        c_ref, r_ref = reward_alone(rm, tok, pair["prompt"], pair["chosen"]), \
            reward_alone(rm, tok, pair["prompt"], pair["rejected"])
        c, r = c.detach(), r.detach()
        assert float(c) == pytest.approx(c_ref, abs=1e-5) and float(r) == pytest.approx(r_ref, abs=1e-5)
        assert float(loss.detach()) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(r_ref - c_ref))),
                                            abs=1e-5)


def test_reward_model_learns_held_out_preferences(tok, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(make_policy(tok, seed=2))
    initial_loss = sum(float(torch.nn.functional.softplus(torch.tensor(
        reward_alone(rm, tok, p["prompt"], p["rejected"]) - reward_alone(rm, tok, p["prompt"], p["chosen"]))))
        for p in PAIRS[:4]) / 4
    config = RewardModelConfig(learning_rate=3e-3, train_batch_size=4, gradient_accumulation_steps=2, num_steps=6)
    history = run_reward_model(rm, tok, PAIRS[:4], config, eval_pairs=PAIRS[4:], out_dir=str(tmp_path))
    evals = [h for h in history if h["kind"] == "eval"]
    train = [h for h in history if h["kind"] == "train"]
    assert [e["step"] for e in evals] == [0, 6] and len(train) == 6
    assert evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.3
    # The first step's logged loss is the batch's mean Bradley–Terry loss under the initial weights.
    assert train[0]["loss"] == pytest.approx(initial_loss, abs=1e-5)
    assert train[1]["loss"] < train[0]["loss"]  # every step sees the same 4 pairs: one step lowered the loss
    assert (tmp_path / "checkpoint.pt").is_file()


# ---- ORPO ----------------------------------------------------------------------------------------------

def mean_response_log_prob_alone(policy, tok, prompt, response):
    prefix = tok.encode(format_prompt("alpaca_sft", instruction=prompt, response=""))
    out = [*tok.encode(response), tok.eos_token_id]
    ids = torch.tensor([prefix + out])
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(ids).double(), dim=-1)[0]
    return sum(float(logp[len(prefix) + i - 1, t]) for i, t in enumerate(out)) / len(out)


def test_orpo_batch_matches_pairs_scored_alone(tok):
    policy = make_policy(tok, seed=3)
    losses, parts = orpo_batch(policy, tok, PAIRS[:3], lam=0.5)
    assert torch.equal(parts["log_odds_ratio"] > 0, parts["odds_ratio_loss"] < torch.log(torch.tensor(2.0)))
    for pair, loss in zip(PAIRS[:3], losses, strict=True):
        w = mean_response_log_prob_alone(policy, tok, pair["prompt"], pair["chosen"])
        lo = mean_response_log_prob_alone(policy, tok, pair["prompt"], pair["rejected"])
        odds = lambda m: torch.tensor(m).exp() / (1 - torch.tensor(m).exp())
        expected = -w + 0.5 * float(torch.log1p(odds(lo) / odds(w)))
        assert float(loss.detach()) == pytest.approx(expected, abs=1e-4)


def test_orpo_raises_the_odds_of_chosen_responses(tok, tmp_path):
    policy = make_policy(tok, seed=4)
    config = ORPOConfig(learning_rate=3e-3, train_batch_size=4, gradient_accumulation_steps=2, num_steps=4,
                        orpo_lambda=1.0)
    history = run_orpo(policy, tok, PAIRS[:4], config, eval_pairs=PAIRS[4:], out_dir=str(tmp_path))
    evals = [h for h in history if h["kind"] == "eval"]
    train = [h for h in history if h["kind"] == "train"]
    assert train[1]["loss"] < train[0]["loss"]  # the same 4 pairs every step: one step lowered the loss
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_nll"] < evals[0]["eval_nll"]
    assert evals[-1]["eval_log_odds_ratio"] > evals[0]["eval_log_odds_ratio"]
    assert evals[-1]["eval_accuracy"] == 1.0


# ---- PPO -----------------------------------------------------------------------------------------------

PROMPTS = [f"Question {i}: what is {i} plus {i + 3}?" for i in range(8)]
GOOD, BAD = " Answer: <answer> 7 </answer>", " The quick brown fox"


class FixedBackend:
    def generate(self, prompts, params):
        return [Completion(i, GOOD if (i + j) % 2 == 0 else BAD, [0], "stop") for i in range(len(prompts))
                for j in range(params.n)]


def contains_answer(response, truth):
    value = float("<answer>" in response)
    return {"reward": value, "format_reward": value, "answer_reward": value}


def per_token(policy, tok, prompt, response):
    p, r = tok.encode(prompt), tok.encode(response)
    with torch.no_grad():
        device = next(policy.parameters()).device
        logp = torch.log_softmax(policy.model(torch.tensor([p + r], device=device)).double(), dim=-1)[0]
    return sum(float(logp[len(p) + i - 1, t]) for i, t in enumerate(r)) / len(r)


def gap(policy, tok):
    return sum(per_token(policy, tok, p, GOOD) - per_token(policy, tok, p, BAD) for p in PROMPTS[:4]) / 4


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="the policy on a GPU needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_step_favours_the_rewarded_response_and_fits_values(tok, device):
    """On CUDA too: the scored batch (old log-probs, values, reference log-probs) must meet the host-side
    scores and masks."""
    torch.manual_seed(0)
    policy = make_policy(tok, seed=5).to(device)
    before = gap(policy, tok)
    config = PPOConfig(n_ppo_steps=1, learning_rate=3e-3, rollout_batch_size=8, samples_per_prompt=2,
                       train_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2, vf_coef=1.0,
                       sampling_max_tokens=8, kl_coef=0.05)
    history = run_ppo(policy, tok, QuestionSet(PROMPTS[:4], ["7"] * 4), config, backend=FixedBackend(),
                      reward_fn=contains_answer)
    record = history[0]
    assert record["optimizer_steps"] == 4 and record["score_mean"] == 0.5 == record["reward_mean"]
    assert record["kl"] == 0.0  # the reference starts as the policy
    assert gap(policy, tok) > before + 0.05


def test_ppo_resumes_exactly_with_native_rollouts(tok, tmp_path):
    questions = QuestionSet(PROMPTS[:4], ["7"] * 4)
    config = PPOConfig(n_ppo_steps=2, learning_rate=1e-3, rollout_batch_size=4, samples_per_prompt=2,
                       train_batch_size=2, gradient_accumulation_steps=1, ppo_epochs=2, sampling_max_tokens=5,
                       eval_max_tokens=4)

    def length_parity(response, truth):
        return {"reward": float(len(response) % 2 == 0)}

    def fresh(seed_head):
        torch.manual_seed(seed_head)
        policy = make_policy(tok, seed=6)
        return policy, ValueHead(32)

    straight, straight_head = fresh(0)
    history = run_ppo(straight, tok, questions, config, eval_questions=questions, out_dir=str(tmp_path / "a"),
                      reward_fn=length_parity, value_head=straight_head)
    assert [h["kind"] for h in history] == ["eval", "train", "train", "eval"]
    part, part_head = fresh(0)
    run_ppo(part, tok, questions, PPOConfig(**{**config.__dict__, "n_ppo_steps": 1}), out_dir=str(tmp_path / "b"),
            reward_fn=length_parity, value_head=part_head)
    resumed, resumed_head = fresh(1)  # another value-head init: the checkpoint must restore it
    run_ppo(resumed, tok, questions, config, out_dir=str(tmp_path / "b"), resume=True, reward_fn=length_parity,
            value_head=resumed_head)
    assert states_equal(straight, resumed) and states_equal(straight_head, resumed_head)
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    a = [r for r in read("a") if r["kind"] == "train"]
    b = [r for r in read("b") if r["kind"] == "train"]
    assert [r["step"] for r in b] == [1, 2]
    for key in ("score_mean", "kl", "pg_loss", "vf_loss", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b]


def test_ppo_with_a_reward_model_and_a_lora_policy(tok):
    """The reward model scores each response; with adapters the reference is the policy with them switched off,
    which must stay the starting model."""
    torch.manual_seed(0)
    policy = make_policy(tok, seed=7)
    start = copy.deepcopy(policy)
    inject_lora(policy, LoRAConfig(rank=4, alpha=8))
    reward_model = RewardModel(make_policy(tok, seed=8))
    config = PPOConfig(n_ppo_steps=2, learning_rate=1e-2, rollout_batch_size=8, samples_per_prompt=2,
                       train_batch_size=8, gradient_accumulation_steps=2, ppo_epochs=1, reward="model",
                       sampling_max_tokens=8)
    history = run_ppo(policy, tok, QuestionSet(PROMPTS[:4], ["7"] * 4), config, backend=FixedBackend(),
                      reward_model=reward_model, reward_fn=contains_answer)
    # Each prompt got one rewarded and one unrewarded response; the reward model (frozen) scored each.
    expected = sum(reward_alone(reward_model, tok, p, r) for p in PROMPTS[:4] for r in (GOOD, BAD)) / 8
    assert history[0]["score_mean"] == pytest.approx(expected, abs=1e-5)
    assert history[0]["reward_mean"] == 0.5  # the rule reward is still logged
    assert history[0]["kl"] == 0.0 and history[1]["kl"] != 0.0
    ids = torch.randint(0, len(tok), (2, 10))
    with lora_disabled(policy):
        torch.testing.assert_close(policy(ids).logits, start(ids).logits, rtol=0, atol=0)
    assert not torch.equal(policy(ids).logits, start(ids).logits)
    with pytest.raises(ValueError, match="needs a trained reward model"):
        run_ppo(make_policy(tok), tok, QuestionSet(PROMPTS[:4], ["7"] * 4), config, backend=FixedBackend())


# ---- GSPO in the GRPO loop -----------------------------------------------------------------------------

def test_gspo_step_in_the_grpo_loop_favours_the_rewarded_response(tok):
    policy = make_policy(tok, seed=9)
    before = gap(policy, tok)
    config = GRPOConfig(n_grpo_steps=1, learning_rate=3e-3, rollout_batch_size=8, group_size=4, train_batch_size=4,
                        gradient_accumulation_steps=2, epochs_per_rollout_batch=2, loss_type="gspo",
                        cliprange=0.2, sampling_max_tokens=8)
    history = run_grpo(policy, tok, QuestionSet(PROMPTS[:4], ["7"] * 4), config, backend=FixedBackend(),
                       reward_fn=contains_answer)
    assert history[0]["optimizer_steps"] == 4
    assert gap(policy, tok) > before + 0.05
    with pytest.raises(ValueError, match="masked_mean"):
        GRPOConfig(loss_type="gspo", length_normalization="masked_normalize").validate()


def test_preference_pairs_from_scored_groups():
    from cs336_alignment.training.reward_model_loop import preference_pairs_from_groups

    prompts = ["p"] * 3 + ["q"] * 3
    responses = ["a", "b", "c", "x", "x", "y"]
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0]
    pairs = preference_pairs_from_groups(prompts, responses, rewards, group_size=3)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p", "a", "b"), ("p", "a", "c"), ("p", "c", "b"), ("q", "x", "y")]  # identical texts give no pair
    assert len(preference_pairs_from_groups(prompts, responses, rewards, 3, max_pairs_per_group=1)) == 2
    with pytest.raises(ValueError, match="groups of 4"):
        preference_pairs_from_groups(prompts, responses, rewards, group_size=4)
