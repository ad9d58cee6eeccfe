"""Incremental (KV-cached) decoding for two model families behind one interface.

A stepper is started on a left-padded batch of prompts and then fed one token per row per step; each call
returns next-token logits for every row. Left padding is hidden by attention masks, and positions count from
each row's first real token, so a row decodes exactly as it would alone.
"""

from typing import Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from cs336_alignment.lm import BasicsCausalLM
from cs336_basics.model import TransformerLM


class Stepper(Protocol):
    def budget(self, prompt_length: int, max_new_tokens: int) -> int:
        """How many new tokens fit (the model's context may allow fewer than asked)."""
        ...

    def start(
        self, tokens: Int[Tensor, "batch seq"], mask: Bool[Tensor, "batch seq"], max_new_tokens: int
    ) -> Float[Tensor, "batch vocab"]: ...

    def step(self, tokens: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]: ...


def _positions(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class HFStepper:
    """Any `transformers` causal LM: `past_key_values` carry the cache, `attention_mask` grows by one column."""

    def __init__(self, model: nn.Module):
        self.model = model

    def budget(self, prompt_length: int, max_new_tokens: int) -> int:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return max_new_tokens if limit is None else max(0, min(max_new_tokens, limit - prompt_length))

    def start(self, tokens: Tensor, mask: Tensor, max_new_tokens: int) -> Tensor:
        self.mask = mask.long()
        positions = _positions(mask)
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = positions[:, -1:] + 1
        return out.logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position,
            past_key_values=self.cache, use_cache=True,
        )
        self.cache = out.past_key_values
        self.next_position = self.next_position + 1
        return out.logits[:, -1]


class BasicsStepper:
    """The cs336_basics `TransformerLM`, through its pre-allocated per-layer `KVCache`s and key mask."""

    def __init__(self, model: TransformerLM):
        self.model = model

    def budget(self, prompt_length: int, max_new_tokens: int) -> int:
        return max(0, min(max_new_tokens, self.model.config.context_length - prompt_length))

    def start(self, tokens: Tensor, mask: Tensor, max_new_tokens: int) -> Tensor:
        batch, length = tokens.shape
        self.key_mask = torch.zeros(batch, length + max_new_tokens, dtype=torch.bool, device=tokens.device)
        self.key_mask[:, :length] = mask
        self.length = length
        self.caches = self.model.new_kv_caches(batch, max_len=length + max_new_tokens)
        positions = _positions(mask)
        self.next_position = positions[:, -1:] + 1
        return self.model(tokens, positions, self.caches, self.key_mask[:, :length])[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        self.key_mask[:, self.length] = True
        self.length += 1
        logits = self.model(tokens[:, None], self.next_position, self.caches, self.key_mask[:, : self.length])
        self.next_position = self.next_position + 1
        return logits[:, -1]


def make_stepper(model: nn.Module) -> Stepper:
    """Picks the stepper for `model` (a bare or wrapped cs336_basics LM, else a transformers model)."""
    if isinstance(model, BasicsCausalLM):
        model = model.model
    if isinstance(model, TransformerLM):
        return BasicsStepper(model)
    return HFStepper(model)
