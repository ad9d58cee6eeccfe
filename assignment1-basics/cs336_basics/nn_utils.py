"""Numerically stable elementwise and reduction functions used by the model and the loss."""

import torch
from jaxtyping import Float, Int
from torch import Tensor


def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax computed in float32 (subtracting the max) and returned in the input dtype."""
    x32 = x.float()
    shifted = x32 - x32.amax(dim=dim, keepdim=True)
    exp = shifted.exp()
    return (exp / exp.sum(dim=dim, keepdim=True)).to(x.dtype)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    x32 = x.float()
    shifted = x32 - x32.amax(dim=dim, keepdim=True)
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def cross_entropy(
    logits: Float[Tensor, "... vocab"], targets: Int[Tensor, "..."]
) -> Float[Tensor, ""]:
    """Mean negative log-likelihood of `targets`; the log-sum-exp trick keeps huge logits finite."""
    logits32 = logits.float()
    max_logit = logits32.amax(dim=-1, keepdim=True)
    log_normaliser = (logits32 - max_logit).exp().sum(dim=-1).log() + max_logit.squeeze(-1)
    target_logit = logits32.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (log_normaliser - target_logit).mean()
