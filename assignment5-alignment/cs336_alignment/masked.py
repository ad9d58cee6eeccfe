"""Reductions over the response tokens only: the glue between per-token losses and scalar objectives."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def _check(tensor: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != tensor.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from tensor shape {tuple(tensor.shape)}")
    return mask.bool()


def masked_sum(tensor: Float[Tensor, "..."], mask: Bool[Tensor, "..."], dim: int | None = None) -> Tensor:
    """Sum of the elements where mask is true; masked-out values (even inf/NaN padding) never leak in."""
    kept = torch.where(_check(tensor, mask), tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_normalize(
    tensor: Float[Tensor, "..."],
    mask: Bool[Tensor, "..."],
    dim: int | None = None,
    normalize_constant: float = 1.0,
) -> Tensor:
    """Masked sum divided by a fixed constant (the Dr. GRPO / SFT normalisation: no per-sequence length)."""
    if normalize_constant == 0:
        raise ValueError("normalize_constant must be non-zero")
    return masked_sum(tensor, mask, dim) / normalize_constant


def masked_mean(tensor: Float[Tensor, "..."], mask: Bool[Tensor, "..."], dim: int | None = None) -> Tensor:
    """Mean over the masked elements along `dim` (all of them when None); an empty slice gives NaN, like mean."""
    count = _check(tensor, mask).to(tensor.dtype if tensor.is_floating_point() else torch.float32)
    total = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(tensor, mask, dim) / total
