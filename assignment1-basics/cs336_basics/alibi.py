"""ALiBi (Press et al. 2022, "Train Short, Test Long"): no position embedding; each head adds a linear
penalty −m_h·(i − j) to the score of query i on key j, so attention decays with distance at a per-head rate."""

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _geometric_slopes(num_heads: int) -> list[float]:
    """For n a power of two the slopes are 2^(−8/n), 2^(−16/n), ..., 2^(−8): a geometric sequence."""
    return [2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)]


def alibi_slopes(num_heads: int, device=None) -> Float[Tensor, " heads"]:
    """The paper's slopes; for n not a power of two, the 2^⌊log2 n⌋ geometric slopes followed by every other
    slope of the sequence for twice that many heads (the ones lying between them), as many as still needed."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    base = 2 ** math.floor(math.log2(num_heads))
    slopes = _geometric_slopes(base) + _geometric_slopes(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_bias(
    slopes: Float[Tensor, " heads"], query_index: Int[Tensor, " queries"], key_index: Int[Tensor, " keys"]
) -> Float[Tensor, "heads queries keys"]:
    """−m_h·(i − j) in float32. Indices, not positions: with left padding the distance between two real
    tokens is the same either way, and padded keys are masked out anyway."""
    distance = (query_index[:, None] - key_index[None, :]).to(torch.float32)
    return -slopes.to(torch.float32)[:, None, None] * distance
