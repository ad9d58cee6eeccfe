"""Activation checkpointing for the `cs336_basics` Transformer: a checkpointed block keeps only its input for
backward and recomputes everything inside it, trading one extra block forward for its activation memory."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from cs336_basics.model import TransformerLM


def checkpoint_blocks(model: TransformerLM, every: int = 1) -> TransformerLM:
    """Checkpoint every `every`-th block of `model` in place (state-dict keys unchanged) and return it.

    Decoding with a KV cache bypasses the checkpoint: it needs no gradients and mutates the cache.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    for i, block in enumerate(model.layers):
        if i % every == 0 and not getattr(block, "_checkpointed", False):
            _checkpoint_module(block)
    return model


def _checkpoint_module(module: nn.Module) -> None:
    inner = module.forward

    @functools.wraps(inner)
    def forward(x, token_positions=None, kv_cache=None, key_mask=None):
        if kv_cache is not None:
            return inner(x, token_positions, kv_cache, key_mask)
        return checkpoint(inner, x, token_positions, None, key_mask, use_reentrant=False)

    module.forward = forward
    module._checkpointed = True
