"""CS336 assignment 5: alignment (SFT, expert iteration, GRPO, DPO).

The training-loop primitives are re-exported here; generation lives in `cs336_alignment.generation` and the
evaluations in `cs336_alignment.evaluation` (both import transformers/vLLM only when used).
"""

from cs336_alignment.dpo import dpo_loss_from_log_probs, per_instance_dpo_loss
from cs336_alignment.grpo import (
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    grpo_microbatch_train_step,
)
from cs336_alignment.lm import BasicsCausalLM, as_causal_lm
from cs336_alignment.logprobs import compute_entropy, get_response_log_probs, label_log_probs
from cs336_alignment.masked import masked_mean, masked_normalize, masked_sum
from cs336_alignment.reward import question_only_reward, r1_zero_reward
from cs336_alignment.sft import sft_loss, sft_microbatch_train_step
from cs336_alignment.sft_data import PackedSFTDataset, iterate_batches
from cs336_alignment.tokenization import tokenize_prompt_and_output

__all__ = [
    "BasicsCausalLM",
    "PackedSFTDataset",
    "as_causal_lm",
    "compute_entropy",
    "compute_group_normalized_rewards",
    "compute_grpo_clip_loss",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "dpo_loss_from_log_probs",
    "get_response_log_probs",
    "grpo_microbatch_train_step",
    "iterate_batches",
    "label_log_probs",
    "masked_mean",
    "masked_normalize",
    "masked_sum",
    "per_instance_dpo_loss",
    "question_only_reward",
    "r1_zero_reward",
    "sft_loss",
    "sft_microbatch_train_step",
    "tokenize_prompt_and_output",
]
