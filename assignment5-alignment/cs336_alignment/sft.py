"""The SFT (and expert-iteration) micro-batch step: masked negative log-likelihood, scaled, backpropagated."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cs336_alignment.masked import masked_mean, masked_normalize


def sft_loss(
    policy_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    normalize_constant: float = 1.0,
) -> Tensor:
    """-(sum of response-token log-probs per sequence / constant), averaged over the batch."""
    per_sequence = masked_normalize(policy_log_probs, response_mask, dim=-1, normalize_constant=normalize_constant)
    return -per_sequence.mean()


def sft_microbatch_train_step(
    policy_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Backpropagates `sft_loss / gradient_accumulation_steps` and returns that scaled loss for logging.

    Dividing here makes the gradients summed over the accumulation steps equal the mean over the whole batch.
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    unscaled = sft_loss(policy_log_probs, response_mask, normalize_constant)
    loss = unscaled / gradient_accumulation_steps
    loss.backward()
    with torch.no_grad():
        metadata = {
            "nll": unscaled.detach(),
            "response_tokens": response_mask.sum().detach(),
            "mean_token_log_prob": masked_mean(policy_log_probs.detach(), response_mask),
        }
    return loss.detach(), metadata
