import math

import pytest
import torch

from cs336_alignment.dpo import per_instance_dpo_loss, preference_sequence
from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.prompts import load_prompt
from cs336_alignment.testing import hf_tokenizer, tiny_basics_lm, tiny_llama

PROMPT, GOOD, BAD = "The quick brown fox jumps over", "the lazy dog.", "their crazy frog."


def _sequence_log_prob_by_hand(model, ids):
    """Sum over t of log softmax(model(ids[:t]))[ids[t]], one prefix at a time, in float64."""
    total = 0.0
    for t in range(1, len(ids)):
        logits = model(torch.tensor([ids[:t]])).logits[0, -1].double()
        total += torch.log_softmax(logits, -1)[ids[t]].item()
    return total


def test_dpo_loss_matches_hand_computation_and_trains_only_the_policy():
    tokenizer = hf_tokenizer()
    policy, reference = tiny_llama(len(tokenizer), seed=0), tiny_llama(len(tokenizer), seed=1)
    good, bad = preference_sequence(tokenizer, PROMPT, GOOD), preference_sequence(tokenizer, PROMPT, BAD)
    text = load_prompt("alpaca_sft").replace("{instruction}", PROMPT).replace("{response}", GOOD)
    assert good == [*tokenizer.encode(text), tokenizer.eos_token_id]
    beta = 0.5
    with torch.no_grad():
        margin = (_sequence_log_prob_by_hand(policy, good) - _sequence_log_prob_by_hand(reference, good)) - (
            _sequence_log_prob_by_hand(policy, bad) - _sequence_log_prob_by_hand(reference, bad))
    expected = -math.log(1 / (1 + math.exp(-beta * margin)))
    loss = per_instance_dpo_loss(policy, reference, tokenizer, beta, PROMPT, GOOD, BAD)
    assert abs(loss.item() - expected) < 1e-4
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in reference.parameters())


def test_dpo_loss_is_log2_against_itself_and_works_with_basics_lm():
    tokenizer = hf_tokenizer()
    lm = BasicsCausalLM(tiny_basics_lm(len(tokenizer), context_length=256))
    loss = per_instance_dpo_loss(lm, lm, tokenizer, 0.1, PROMPT, GOOD, BAD)
    assert abs(loss.item() - math.log(2)) < 1e-6
    with pytest.raises(ValueError, match="beta must be positive"):
        per_instance_dpo_loss(lm, lm, tokenizer, 0.0, PROMPT, GOOD, BAD)
