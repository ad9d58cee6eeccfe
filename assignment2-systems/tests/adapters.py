"""The course harness's adapter functions (union of the 2025 rev e495ed7 and 2026 HEAD adapters).

Drop the course's `tests/` files next to this one and they run against `cs336_systems`.
"""

from __future__ import annotations

import torch

from cs336_systems.distributed import FSDP, DDPBucketed, DDPIndividualParameters, ShardedOptimizer


def get_flashattention_autograd_function_pytorch() -> type:
    """The pure-PyTorch FlashAttention-2 `torch.autograd.Function` class (tiled forward, recomputing backward)."""
    from cs336_systems.flash_attention import FlashAttentionPytorch

    return FlashAttentionPytorch


def get_flashattention_autograd_function_triton() -> type:
    """The Triton FlashAttention-2 `torch.autograd.Function` class (Triton forward and backward kernels)."""
    from cs336_systems.flash_attention import FlashAttentionTriton

    return FlashAttentionTriton


# ---- 2025 harness: DDP with per-parameter and bucketed gradient all-reduce


def get_ddp_individual_parameters(module: torch.nn.Module) -> torch.nn.Module:
    return DDPIndividualParameters(module)


def ddp_individual_parameters_on_after_backward(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    ddp_model.finish_gradient_synchronization()


def get_ddp_bucketed(module: torch.nn.Module, bucket_size_mb: float) -> torch.nn.Module:
    return DDPBucketed(module, bucket_size_mb)


def ddp_bucketed_on_after_backward(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    ddp_model.finish_gradient_synchronization()


def ddp_bucketed_on_train_batch_start(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    ddp_model.reset()


# ---- 2026 harness: one overlapped DDP, FSDP


def get_ddp(module: torch.nn.Module) -> torch.nn.Module:
    return DDPIndividualParameters(module)


def ddp_on_after_backward(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    ddp_model.finish_gradient_synchronization()


def get_fsdp(module: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    return FSDP(module, compute_dtype=compute_dtype)


def fsdp_on_after_backward(fsdp_model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    fsdp_model.finish_gradient_synchronization()


def fsdp_gather_full_params(fsdp_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return fsdp_model.gather_full_params()


# ---- both harnesses: ZeRO-1 optimizer-state sharding


def get_sharded_optimizer(params, optimizer_cls: type[torch.optim.Optimizer], **kwargs) -> torch.optim.Optimizer:
    return ShardedOptimizer(params, optimizer_cls, **kwargs)
