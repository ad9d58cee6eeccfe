"""Input checks, shape folding and output allocation shared by the PyTorch and Triton FlashAttention-2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

_POISON = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Allocate every kernel output prefilled with NaN instead of `torch.empty`, so that a tile nobody
    wrote shows up as NaN in tests (uninitialized memory often happens to hold plausible numbers)."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def alloc(shape: tuple[int, ...], *, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`torch.empty`, or a NaN-filled tensor inside `poisoned_outputs()`."""
    dtype = like.dtype if dtype is None else dtype
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, allowed_dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """Fail early, with a readable message, on inputs the kernels would silently mis-index.

    Accepted layouts: (batch, seq, d) or (batch, heads, seq, d); q may have a different sequence length
    from k and v (causal masking is then aligned top-left: query i sees keys 0..i)."""
    if not (q.ndim == k.ndim == v.ndim and q.ndim in (3, 4)):
        raise ValueError(
            f"q, k, v must all be (batch, seq, d) or (batch, heads, seq, d); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            f"q, k, v leading (batch/head) dims differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of keys; got {k.shape[-2]} and {v.shape[-2]}")
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise ValueError(f"q, k, v must share the head dimension; got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if q.shape[-2] == 0 or k.shape[-2] == 0 or q.shape[-1] == 0:
        raise ValueError("empty sequence or head dimension")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"attention needs floating-point inputs; got {q.dtype}")
    if allowed_dtypes is not None and q.dtype not in allowed_dtypes:
        raise TypeError(f"dtype {q.dtype} not supported here; use one of {allowed_dtypes}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def as_4d(x: Tensor) -> Tensor:
    """View (batch, seq, d) as (batch, 1, seq, d) without copying; 4-D passes through."""
    return x.unsqueeze(1) if x.ndim == 3 else x


def lse_shape(q: Tensor) -> tuple[int, ...]:
    """Shape of the saved logsumexp: q's shape without the head dimension d."""
    return tuple(q.shape[:-1])
