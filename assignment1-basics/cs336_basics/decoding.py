"""Sampling from a TransformerLM: temperature, nucleus (top-p), stop token, batched prompts, KV cache."""

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from cs336_basics.model import TransformerLM


def sample_next_token(
    logits: Float[Tensor, "batch vocab"],
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Temperature 0 is greedy; otherwise sample from the smallest set of tokens whose mass reaches top_p."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def top_p_filter(probs: Float[Tensor, "batch vocab"], top_p: float | Float[Tensor, " batch"]) -> Tensor:
    """Zeroes every token outside the smallest set whose mass reaches top_p (one value, or one per row); the
    top token always stays."""
    if isinstance(top_p, Tensor):
        top_p = top_p[:, None]
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_token_id: int | None = None,
    generator: torch.Generator | None = None,
    num_ids: int | None = None,
) -> list[list[int]]:
    """Continues each prompt; returns only the new tokens, cut before `stop_token_id`. With `num_ids`, only ids
    below it are sampled (a model whose vocabulary is larger than its tokenizer's never yields an id the
    tokenizer cannot decode).

    Prompts are left-padded into one batch, the padding hidden by a key mask and the positions counted
    from each prompt's first real token, so every row is decoded exactly as if it were alone. One prefill
    pass fills the KV caches; each further token costs one single-position forward pass.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    context = model.config.context_length
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise ValueError(f"a prompt of {longest} tokens exceeds context_length={context}")
    max_new_tokens = min(max_new_tokens, context - longest)
    device = model.lm_head.weight.device
    batch = len(prompts)
    total = longest + max_new_tokens

    tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)
    key_mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.as_tensor(prompt, device=device)
        key_mask[row, longest - len(prompt) :] = True
    pad = longest - key_mask[:, :longest].sum(dim=1, keepdim=True)
    positions = (torch.arange(longest, device=device) - pad).clamp(min=0)

    was_training = model.training
    model.eval()
    caches = model.new_kv_caches(batch, max_len=total)
    logits = model(tokens, positions, caches, key_mask[:, :longest])[:, -1]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    active = [True] * batch
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        if num_ids is not None and num_ids < logits.shape[-1]:
            logits = logits.clone()
            logits[:, num_ids:] = float("-inf")
        next_token = sample_next_token(logits, temperature, top_p, generator)
        for row, token in enumerate(next_token.tolist()):
            if active[row]:
                if token == stop_token_id:
                    active[row] = False
                else:
                    outputs[row].append(token)
        if not any(active) or step == max_new_tokens - 1:
            break
        key_mask[:, longest + step] = True
        logits = model(next_token[:, None], next_position, caches, key_mask[:, : longest + step + 1])[:, -1]
        next_position = next_position + 1
    model.train(was_training)
    return outputs
