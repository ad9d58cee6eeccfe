"""Reward model training: Bradley–Terry on preference pairs (the DPO loop's data and template), held-out
pairwise accuracy."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from cs336_alignment.reward_model import RewardModel, reward_model_batch
from cs336_alignment.training.pairwise import PairwiseConfig, run_pairwise
from cs336_basics.cli_support import StopRequest


def preference_pairs_from_groups(
    prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float], group_size: int,
    max_pairs_per_group: int | None = None,
) -> list[dict[str, str]]:
    """Preference pairs from scored rollout groups (consecutive `group_size` responses answer one prompt): every
    (higher-reward, lower-reward) pair of distinct responses within a group, in a fixed order (rank by reward,
    then position), at most `max_pairs_per_group` per group. This is how a reward model for PPO can be learned
    from a rule reward's judgements (issue 20's "PPO with a learned reward model")."""
    if not len(prompts) == len(responses) == len(rewards):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(rewards)} rewards")
    if group_size < 1 or len(prompts) % group_size:
        raise ValueError(f"{len(prompts)} rollouts do not split into groups of {group_size}")
    pairs: list[dict[str, str]] = []
    for start in range(0, len(prompts), group_size):
        group = range(start, start + group_size)
        kept = []
        for i in group:
            for j in group:
                if rewards[i] > rewards[j] and responses[i] != responses[j]:
                    kept.append({"prompt": prompts[i], "chosen": responses[i], "rejected": responses[j]})
        pairs += kept if max_pairs_per_group is None else kept[:max_pairs_per_group]
    return pairs


@dataclass
class RewardModelConfig(PairwiseConfig):
    """InstructGPT trained its reward model for one epoch at about 9e-6; the head is new, the trunk pretrained."""


def run_reward_model(
    reward_model: RewardModel,
    tokenizer: Any,
    train_pairs: Sequence[dict[str, str]],
    config: RewardModelConfig,
    eval_pairs: Sequence[dict[str, str]] | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop: StopRequest | None = None,
) -> list[dict[str, Any]]:
    """Minimises -log σ(r(x, y_w) - r(x, y_l)); logs loss, accuracy (r_w > r_l) and the mean reward margin."""

    def batch_fn(model: nn.Module, pairs: Sequence[dict[str, str]]):
        losses, chosen, rejected = reward_model_batch(model, tokenizer, pairs)
        margin = (chosen - rejected).detach()
        return losses, margin > 0, {"margin": margin, "chosen_reward": chosen.detach()}

    return run_pairwise("reward-model", reward_model, train_pairs, config, batch_fn, eval_pairs, out_dir, resume,
                        overwrite, stop)
