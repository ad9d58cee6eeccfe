"""Reward model training: Bradley–Terry on preference pairs (the DPO loop's data and template), held-out
pairwise accuracy."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from cs336_alignment.reward_model import RewardModel, reward_model_batch
from cs336_alignment.training.pairwise import PairwiseConfig, run_pairwise
from cs336_basics.cli_support import StopRequest


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
