"""Dense attention that materializes the whole score matrix: the reference for tests and the naive
baseline in benchmarks."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor


def causal_keep(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """keep[i, j] = True where query i may attend to key j (top-left aligned: j <= i)."""
    return torch.arange(n_queries, device=device)[:, None] >= torch.arange(n_keys, device=device)[None, :]


def attention_with_lse(
    q: Float[Tensor, "... nq d"],
    k: Float[Tensor, "... nk d"],
    v: Float[Tensor, "... nk d"],
    is_causal: bool = False,
) -> tuple[Float[Tensor, "... nq d"], Float[Tensor, "... nq"]]:
    """O = softmax(q kᵀ/√d) v and L = logsumexp of the scaled scores, in the inputs' dtype (differentiable)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~causal_keep(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return probs @ v, lse


def naive_attention(
    q: Float[Tensor, "... nq d"],
    k: Float[Tensor, "... nk d"],
    v: Float[Tensor, "... nk d"],
    is_causal: bool = False,
) -> Float[Tensor, "... nq d"]:
    """Plain PyTorch attention as a model would write it (softmax over a materialized score matrix)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~causal_keep(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
