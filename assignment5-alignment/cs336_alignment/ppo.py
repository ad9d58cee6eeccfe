"""PPO for language models (InstructGPT, Ouyang et al. 2022; Schulman et al. 2017) as pure functions on
(batch, seq) tensors whose `response_mask` marks the response tokens (one contiguous run per row).

- `kl_penalized_rewards`: r_t = -β (log π(y_t) - log π_ref(y_t)) on every response token, plus the
  sequence's score (rule reward or reward model) on its last response token.
- `gae_advantages`: GAE(λ) (Schulman et al. 2016) over the response tokens, with V = 0 after the last one;
  returns are advantages + values (the value target).
- `ppo_policy_loss`: -min(ρ A, clip(ρ, 1-ε, 1+ε) A) per token, ρ = π/π_old.
- `ppo_value_loss`: ½ max((V - R)², (clip(V, V_old ± ε_v) - R)²) per token.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cs336_alignment.masked import masked_mean


def _check_shapes(reference: Tensor, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}")


def last_token_mask(response_mask: Bool[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq"]:
    """True at each row's last response token (rows without response tokens stay all False)."""
    mask = response_mask.bool()
    following = torch.zeros_like(mask)
    following[:, :-1] = mask[:, 1:]
    return mask & ~following


def kl_penalized_rewards(
    scores: Float[Tensor, " batch"],
    log_probs: Float[Tensor, "batch seq"],
    ref_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    kl_coef: float,
) -> tuple[Float[Tensor, "batch seq"], Float[Tensor, "batch seq"]]:
    """Per-token rewards of InstructGPT's objective R(x, y) - β log(π(y|x) / π_ref(y|x)), spread over tokens:
    the KL estimate log π - log π_ref of each sampled token is penalised where it is produced, the score is
    paid at the end. Returns (rewards, per-token KL estimates), both 0 outside the response."""
    _check_shapes(log_probs, ref_log_probs=ref_log_probs, response_mask=response_mask)
    if scores.shape != log_probs.shape[:1]:
        raise ValueError(f"scores must have shape ({log_probs.shape[0]},), got {tuple(scores.shape)}")
    mask = response_mask.bool()
    kl = torch.where(mask, log_probs - ref_log_probs, torch.zeros_like(log_probs))
    rewards = -kl_coef * kl
    rewards = rewards + last_token_mask(mask).to(rewards.dtype) * scores.to(rewards.dtype)[:, None]
    return rewards, kl


def gae_advantages(
    rewards: Float[Tensor, "batch seq"],
    values: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Float[Tensor, "batch seq"], Float[Tensor, "batch seq"]]:
    """GAE(λ): δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1}, with V and A of the state after the last
    response token equal to 0 (the episode ends). Computed by one backward sweep over the sequence; positions
    outside the response get 0. Returns (advantages, returns = advantages + values)."""
    _check_shapes(rewards, values=values, response_mask=response_mask)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must lie in [0, 1], got {gamma}, {lam}")
    mask = response_mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage
    return advantages, (advantages + values) * mask


def whiten(values: Float[Tensor, "batch seq"], mask: Bool[Tensor, "batch seq"], eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over the masked entries (population std); 0 outside the mask."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return torch.where(mask.bool(), (values - mean) / (var.sqrt() + eps), torch.zeros_like(values))


def ppo_policy_loss(
    log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch seq"],
    cliprange: float,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    """PPO's clipped surrogate per token, negated: -min(ρ A, clip(ρ, 1-ε, 1+ε) A), ρ = exp(log π - log π_old)."""
    _check_shapes(log_probs, old_log_probs=old_log_probs, advantages=advantages)
    if cliprange < 0:
        raise ValueError(f"cliprange must be >= 0, got {cliprange}")
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * advantages
    return -torch.minimum(unclipped, clipped), {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


def ppo_value_loss(
    values: Float[Tensor, "batch seq"],
    old_values: Float[Tensor, "batch seq"],
    returns: Float[Tensor, "batch seq"],
    cliprange_value: float,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    """½ max((V - R)², (V_old + clip(V - V_old, -ε, ε) - R)²) per token: the value may not profit from moving
    further than ε from the value it had when the rollouts were scored."""
    _check_shapes(values, old_values=old_values, returns=returns)
    if cliprange_value < 0:
        raise ValueError(f"cliprange_value must be >= 0, got {cliprange_value}")
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), {"clipped": (clipped_loss > unclipped_loss).detach()}
