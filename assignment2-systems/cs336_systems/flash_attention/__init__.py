"""FlashAttention-2: a pure-PyTorch autograd Function and a Triton one (forward and backward kernels).

`FlashAttentionTriton` is imported lazily, so CPU-only machines without a working Triton import the
package fine; touching it there raises the ImportError from Triton.
"""

from __future__ import annotations

from typing import Any

from cs336_systems.flash_attention._common import poisoned_outputs
from cs336_systems.flash_attention.pytorch_impl import FlashAttentionPytorch
from cs336_systems.flash_attention.reference import attention_with_lse, naive_attention

__all__ = [
    "FlashAttentionPytorch",
    "FlashAttentionTriton",
    "attention_with_lse",
    "naive_attention",
    "poisoned_outputs",
    "triton_available",
]


def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (the kernels' only target here)."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def __getattr__(name: str) -> Any:
    if name == "FlashAttentionTriton":
        from cs336_systems.flash_attention.triton_impl import FlashAttentionTriton

        return FlashAttentionTriton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
