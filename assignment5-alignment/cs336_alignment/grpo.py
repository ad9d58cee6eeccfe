"""Group-relative advantages, policy-gradient losses (naive, REINFORCE with baseline, GRPO-Clip, GSPO) and the
step."""

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from cs336_alignment.masked import masked_mean, masked_normalize

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip", "gspo"]
LOSS_TYPES: tuple[str, ...] = ("no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip", "gspo")
IMPORTANCE_WEIGHTED: tuple[str, ...] = ("grpo_clip", "grpo_no_clip", "gspo")
RewardFn = Callable[[str, str], dict[str, float]]


def compute_group_normalized_rewards(
    reward_fn: RewardFn,
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[Float[Tensor, " rollouts"], Float[Tensor, " rollouts"], dict[str, float]]:
    """Scores each rollout, then subtracts its group's mean reward (and divides by std + eps when asked).

    Rollouts are grouped consecutively: rollouts [k*G, (k+1)*G) answer the same question. The std is the
    unbiased sample std, as in DeepSeekMath's GRPO.
    """
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(f"{len(rollout_responses)} responses but {len(repeated_ground_truths)} ground truths")
    if group_size < 1 or len(rollout_responses) % group_size:
        raise ValueError(f"{len(rollout_responses)} rollouts do not split into groups of {group_size}")
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths, strict=True)]
    raw = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)
    groups = rearrange(raw, "(groups size) -> groups size", size=group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_by_std:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = centred / (std + advantage_eps)
    advantages = rearrange(centred, "groups size -> (groups size)")
    metadata = {
        "reward_mean": raw.mean().item(),
        "reward_std": raw.std().item() if raw.numel() > 1 else 0.0,
        "reward_max": raw.max().item(),
        "reward_min": raw.min().item(),
        "group_std_mean": groups.std(dim=1).mean().item() if group_size > 1 else 0.0,
        "fraction_groups_all_equal": (groups == groups[:, :1]).all(dim=1).float().mean().item(),
    }
    for key in ("format_reward", "answer_reward"):
        if all(key in s for s in scores):
            metadata[f"{key}_mean"] = sum(float(s[key]) for s in scores) / len(scores)
    return advantages, raw, metadata


def _per_sequence(values: Tensor, log_probs: Tensor, name: str) -> Tensor:
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    if values.shape != (log_probs.shape[0], 1):
        raise ValueError(f"{name} must have shape (batch, 1) or (batch,), got {tuple(values.shape)}")
    return values.to(log_probs.dtype)


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: Float[Tensor, "batch 1"],
    policy_log_probs: Float[Tensor, "batch seq"],
) -> Float[Tensor, "batch seq"]:
    """-A * log pi per token; its gradient is the REINFORCE estimate (with a baseline when A is centred)."""
    return -_per_sequence(raw_rewards_or_advantages, policy_log_probs, "rewards/advantages") * policy_log_probs


def compute_grpo_clip_loss(
    advantages: Float[Tensor, "batch 1"],
    policy_log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    cliprange: float,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    """-min(r A, clip(r, 1-eps, 1+eps) A) with r = pi/pi_old per token; metadata marks the clipped tokens."""
    if old_log_probs.shape != policy_log_probs.shape:
        raise ValueError(f"old_log_probs {tuple(old_log_probs.shape)} differ from {tuple(policy_log_probs.shape)}")
    if cliprange < 0:
        raise ValueError(f"cliprange must be >= 0, got {cliprange}")
    adv = _per_sequence(advantages, policy_log_probs, "advantages")
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


def compute_grpo_no_clip_loss(
    advantages: Float[Tensor, "batch 1"],
    policy_log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    """-r A: the importance-weighted off-policy gradient without clipping (the handout's clip ablation)."""
    adv = _per_sequence(advantages, policy_log_probs, "advantages")
    ratio = torch.exp(policy_log_probs - old_log_probs)
    return -ratio * adv, {"ratio": ratio.detach()}


def gspo_sequence_ratio(
    policy_log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
) -> Float[Tensor, " batch"]:
    """GSPO's importance ratio s_i = (π(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp(mean_t (log π - log π_old))."""
    if old_log_probs.shape != policy_log_probs.shape or response_mask.shape != policy_log_probs.shape:
        raise ValueError(f"old_log_probs {tuple(old_log_probs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must match {tuple(policy_log_probs.shape)}")
    return torch.exp(masked_mean(policy_log_probs - old_log_probs, response_mask, dim=-1))


def compute_gspo_loss(
    advantages: Float[Tensor, "batch 1"],
    policy_log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    cliprange: float,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): -min(s_i A_i, clip(s_i, 1-ε, 1+ε) A_i) with the length-normalised sequence
    ratio s_i, so a whole response is clipped or not. The sequence loss is repeated on each of its response
    tokens, so the per-sequence masked mean of the step gives exactly the sequence objective. The paper's
    clip range is about 3e-4 to 4e-4 (sequence ratios stay much closer to 1 than token ratios)."""
    if cliprange < 0:
        raise ValueError(f"cliprange must be >= 0, got {cliprange}")
    adv = _per_sequence(advantages, policy_log_probs, "advantages")
    ratio = gspo_sequence_ratio(policy_log_probs, old_log_probs, response_mask).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * adv
    per_sequence = -torch.minimum(unclipped, clipped)
    shape = policy_log_probs.shape
    return per_sequence.expand(shape), {"clipped": (clipped < unclipped).detach().expand(shape),
                                        "ratio": ratio.detach().expand(shape)}


def compute_policy_gradient_loss(
    policy_log_probs: Float[Tensor, "batch seq"],
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
    response_mask: Tensor | None = None,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    """Dispatches on `loss_type`; raises a one-line error naming the missing argument (`gspo` also needs the
    response mask, for its sequence-level ratio)."""

    def need(value, name: str):
        if value is None:
            raise ValueError(f"loss_type={loss_type!r} needs {name}")
        return value

    if loss_type == "no_baseline":
        return compute_naive_policy_gradient_loss(need(raw_rewards, "raw_rewards"), policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(need(advantages, "advantages"), policy_log_probs), {}
    if loss_type == "grpo_clip":
        return compute_grpo_clip_loss(
            need(advantages, "advantages"), policy_log_probs, need(old_log_probs, "old_log_probs"),
            need(cliprange, "cliprange"),
        )
    if loss_type == "grpo_no_clip":
        return compute_grpo_no_clip_loss(
            need(advantages, "advantages"), policy_log_probs, need(old_log_probs, "old_log_probs")
        )
    if loss_type == "gspo":
        return compute_gspo_loss(
            need(advantages, "advantages"), policy_log_probs, need(old_log_probs, "old_log_probs"),
            need(response_mask, "response_mask"), need(cliprange, "cliprange"),
        )
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def grpo_microbatch_train_step(
    policy_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    gradient_accumulation_steps: int,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
    normalize_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss -> per-sequence mean over response tokens -> batch mean -> / accumulation; backward.

    With `normalize_constant` the per-sequence mean becomes a masked sum divided by that constant (Dr. GRPO's
    length-unbiased aggregation). Returns the scaled loss and detached statistics (policy loss, clip fraction,
    mean ratio). `gspo` needs the per-sequence mean (its loss is already one value per sequence).
    """
    if loss_type == "gspo" and normalize_constant is not None:
        raise ValueError("loss_type='gspo' is a sequence-level loss: use the per-sequence mean, not a constant")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    per_token, meta = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange, response_mask
    )
    if normalize_constant is None:
        per_sequence = masked_mean(per_token, response_mask, dim=-1)
    else:
        per_sequence = masked_normalize(per_token, response_mask, dim=-1, normalize_constant=normalize_constant)
    unscaled = per_sequence.mean()
    loss = unscaled / gradient_accumulation_steps
    loss.backward()
    metadata: dict[str, Tensor] = {"policy_loss": unscaled.detach()}
    with torch.no_grad():
        if "clipped" in meta:
            metadata["clip_fraction"] = masked_mean(meta["clipped"].to(per_token.dtype), response_mask)
        if "ratio" in meta:
            metadata["ratio_mean"] = masked_mean(meta["ratio"], response_mask)
    return loss.detach(), metadata
