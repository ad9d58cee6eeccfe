"""The primitives composed the way the training loops will use them, on a tiny random Llama."""

import torch

from cs336_alignment.grpo import compute_group_normalized_rewards, grpo_microbatch_train_step
from cs336_alignment.logprobs import get_response_log_probs
from cs336_alignment.masked import masked_sum
from cs336_alignment.sft import sft_microbatch_train_step
from cs336_alignment.testing import hf_tokenizer, tiny_llama
from cs336_alignment.tokenization import tokenize_prompt_and_output


def _sequence_log_probs(model, batch):
    out = get_response_log_probs(model, batch["input_ids"], batch["labels"])
    return masked_sum(out["log_probs"], batch["response_mask"], dim=-1)


def test_sft_steps_with_accumulation_fit_the_responses():
    tokenizer = hf_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0).train()
    batch = tokenize_prompt_and_output(["Question 1: what is 1 plus 4?", "Question 2"],
                                       [" Answer: 5.", " <answer> 2 </answer>"], tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = _sequence_log_probs(model, batch)
    for _ in range(15):
        for half in (slice(0, 1), slice(1, 2)):  # two micro-batches per optimizer step
            micro = {k: v[half] for k, v in batch.items()}
            log_probs = get_response_log_probs(model, micro["input_ids"], micro["labels"])["log_probs"]
            sft_microbatch_train_step(log_probs, micro["response_mask"], gradient_accumulation_steps=2)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = _sequence_log_probs(model, batch)
    assert (after > before + 5).all()


def test_grpo_clip_steps_favour_the_rewarded_rollout():
    tokenizer = hf_tokenizer()
    model = tiny_llama(len(tokenizer), seed=1).train()
    prompt = "Question 3: what is 3 plus 6?"
    rollouts = [" </think> <answer> 9 </answer>", " </think> <answer> 4 </answer>"]
    advantages, raw, _ = compute_group_normalized_rewards(
        lambda response, truth: {"reward": float(truth in response)}, rollouts, ["9", "9"], 2, 1e-6, True)
    assert raw.tolist() == [1.0, 0.0]
    batch = tokenize_prompt_and_output([prompt, prompt], rollouts, tokenizer)
    with torch.no_grad():
        old = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        gap_before = (lambda s: s[0] - s[1])(_sequence_log_probs(model, batch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(8):  # several off-policy steps on one rollout batch, as GRPO-Clip allows
        log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        _, meta = grpo_microbatch_train_step(log_probs, batch["response_mask"], 1, "grpo_clip",
                                             advantages=advantages[:, None], old_log_probs=old, cliprange=0.2)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        gap_after = (lambda s: s[0] - s[1])(_sequence_log_probs(model, batch))
    assert gap_after > gap_before
    assert 0 <= meta["clip_fraction"] <= 1


def test_sample_rollouts_groups_by_question_and_feeds_the_reward_code():
    from cs336_alignment.generation import NativeBackend, SamplingParams
    from cs336_alignment.rollouts import sample_rollouts

    tokenizer = hf_tokenizer()
    backend = NativeBackend(tiny_llama(len(tokenizer), seed=2), tokenizer, batch_size=4)
    batch = sample_rollouts(backend, ["Question 1", "Question 2"], ["1", "2"], group_size=3,
                            params=SamplingParams(temperature=1.0, max_tokens=4, seed=0))
    assert batch.prompts == ["Question 1"] * 3 + ["Question 2"] * 3
    assert batch.ground_truths == ["1"] * 3 + ["2"] * 3 and len(batch.responses) == 6
    advantages, _, _ = compute_group_normalized_rewards(
        lambda r, t: {"reward": float(len(r) % 2)}, batch.responses, batch.ground_truths, 3, 1e-6, False)
    assert abs(advantages[:3].sum()) < 1e-6 and abs(advantages[3:].sum()) < 1e-6
    tokenized = tokenize_prompt_and_output(batch.prompts, batch.responses, tokenizer)
    assert tokenized["input_ids"].shape[0] == 6
